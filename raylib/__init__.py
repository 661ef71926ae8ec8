"""raylib: the model package shared by the Ray Data, Ray Train and Ray Serve planes.

The core (model, scoring, losses, metrics, filters, mining) imports no Ray.
"""

from raylib.encoding import truncate_dims
from raylib.model import Encoder, EncoderSettings, ModelSpec
from raylib.registry import resolve_model_path

__all__ = ["Encoder", "EncoderSettings", "ModelSpec", "resolve_model_path", "truncate_dims"]
__version__ = "0.1.0"
