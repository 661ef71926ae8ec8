"""Local or s3:// paths as pyarrow filesystems (no Ray): the S3 endpoint comes from AWS_ENDPOINT_URL.

S3 filesystems are built with `allow_delayed_open=True`: pyarrow's multipart uploads fail to
complete against some S3-compatible servers (moto), and delayed open avoids that path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pyarrow.fs as pafs

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def is_s3(path: str) -> bool:
    """True for s3:// (or s3a://) URIs."""
    return str(path).startswith(("s3://", "s3a://"))


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL / AWS_REGION / AWS_DEFAULT_REGION."""
    kwargs: dict = {"allow_delayed_open": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme = "https"
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        kwargs["endpoint_override"] = endpoint.rstrip("/")
        kwargs["scheme"] = scheme
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # explicit keys travel with the (pickled) filesystem to Ray workers, whose environment
        # may not have them; without them pyarrow's default credential chain is used
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    path = str(path)
    if is_s3(path):
        return s3_filesystem(), path.split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def file_format(path: str) -> str | None:
    """'parquet', 'jsonl' or None, from the file name."""
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else os.path.basename(path)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_data_files(paths: str | Sequence[str]) -> tuple[pafs.FileSystem, list[str], list[str]]:
    """Expand files/dirs (one storage kind) into (fs, parquet files, jsonl files); ValueError if none.

    Directories are listed recursively; names starting with '_' or '.' are skipped (Ray's rule).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no input paths given")
    kinds = {is_s3(str(p)) for p in items}
    if len(kinds) > 1:
        raise ValueError("input paths mix s3:// and local paths")
    fs = filesystem_for(str(items[0]))[0]
    parquet, jsonl = [], []
    for item in items:
        _, inner = filesystem_for(str(item))
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"input path not found: {item}")
        if info.type == pafs.FileType.Directory:
            found = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                     if i.type == pafs.FileType.File and not _hidden(i.path, inner)]
        else:
            found = [inner]
        for f in sorted(found):
            kind = file_format(f)
            if kind == "parquet":
                parquet.append(f)
            elif kind == "jsonl":
                jsonl.append(f)
            elif info.type != pafs.FileType.Directory:
                raise ValueError(f"{item}: unknown file type (expected .parquet or .jsonl)")
    if not parquet and not jsonl:
        raise ValueError(f"no .parquet or .jsonl files under {paths}")
    return fs, parquet, jsonl


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file (a summary, a plot) to a local path or s3:// URI."""
    fs, inner = filesystem_for(path)
    if not is_s3(path):
        os.makedirs(os.path.dirname(inner) or ".", exist_ok=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Write a small text file (e.g. a summary) to a local path or s3:// URI."""
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    """Read a small file from a local path or s3:// URI."""
    fs, inner = filesystem_for(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    """Read a small text file from a local path or s3:// URI."""
    return read_bytes(path).decode("utf-8")


def exists(path: str) -> bool:
    """Whether a file or directory exists at a local path or s3:// URI."""
    fs, inner = filesystem_for(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def copy_tree(src: str, dst: str) -> None:
    """Copy a file or directory between local paths and s3:// URIs."""
    src_fs, src_inner = filesystem_for(src)
    dst_fs, dst_inner = filesystem_for(dst)
    if not is_s3(dst):
        os.makedirs(dst_inner if src_fs.get_file_info(src_inner).type == pafs.FileType.Directory
                    else os.path.dirname(dst_inner), exist_ok=True)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def join(base: str, *parts: str) -> str:
    """Join path parts; works for s3:// URIs too."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def cache_dir() -> Path:
    """$RAYLIB_CACHE or ~/.cache/raylib: converted models, checkpoints copied from storage."""
    return Path(os.environ.get("RAYLIB_CACHE") or Path.home() / ".cache" / "raylib")
