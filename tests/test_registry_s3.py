"""Models named by an s3:// URI (a checkpoint another node wrote) are copied into the local cache:
once per content, and again when the model at that URI is written anew (moto S3 server)."""

from __future__ import annotations

import pytest

from test_s3 import s3_server  # noqa: F401  (fixture)


def test_s3_model_cached_per_content(s3_server, tmp_path, monkeypatch):  # noqa: F811
    import boto3

    from raylib.model import Encoder
    from raylib.registry import resolve_model_path
    from raylib.storage import copy_tree
    from raylib.tiny import save_tiny_encoder

    monkeypatch.setenv("RAYLIB_CACHE", str(tmp_path / "cache"))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    uri = "s3://models/encoder"
    copy_tree(str(save_tiny_encoder(tmp_path / "a", seed=0)), uri)
    first = resolve_model_path(uri)
    assert first.is_relative_to(tmp_path / "cache") and (first / "config.json").exists()
    assert resolve_model_path(uri + "/") == first  # same content: the cached copy

    copy_tree(str(save_tiny_encoder(tmp_path / "b", seed=1, hidden_size=16)), uri)  # written anew
    second = resolve_model_path(uri)
    assert second != first
    assert Encoder.from_pretrained(uri).dim == 16  # not the stale 32-d copy
    with pytest.raises(ValueError, match="no files"):
        resolve_model_path("s3://models/missing")
