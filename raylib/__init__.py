"""raylib: the model package shared by the Ray Data, Ray Train and Ray Serve planes.

The core (model, scoring, losses, metrics, filters, mining) imports no Ray. The names below load
on first use (PEP 562): a Ray worker that runs a filter or a Parquet write imports
`raylib.<module>` without paying for torch (1.5-2 s a process).
"""

from importlib import import_module
from typing import TYPE_CHECKING

__all__ = ["Encoder", "EncoderSettings", "ModelSpec", "resolve_model_path", "truncate_dims"]
__version__ = "0.1.0"
_HOMES = {"Encoder": "raylib.model", "EncoderSettings": "raylib.model", "ModelSpec": "raylib.model",
          "resolve_model_path": "raylib.registry", "truncate_dims": "raylib.encoding"}

if TYPE_CHECKING:
    from raylib.encoding import truncate_dims
    from raylib.model import Encoder, EncoderSettings, ModelSpec
    from raylib.registry import resolve_model_path


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'raylib' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
