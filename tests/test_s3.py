"""S3 round trip against a real S3-compatible HTTP server (moto's standalone server on 127.0.0.1):
input read from s3://, kept pairs, rejects and summary written back to s3://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from test_filter_job import make_input, patient_ray  # noqa: E402,F401  (data maker, fixture)
from raylib.ports import free_port



@pytest.fixture
def s3_server(monkeypatch):
    """moto's threaded S3 server; AWS_* env points pyarrow/boto3 (and Ray workers) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    server.stop()


def test_storage_round_trip_without_ray(s3_server):
    import boto3

    from raylib.storage import list_data_files, read_text, write_text

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="unit")
    write_text("s3://unit/a/_summary.json", '{"x": 1}')
    write_text("s3://unit/a/part.jsonl", '{"query": "q"}\n')
    assert json.loads(read_text("s3://unit/a/_summary.json")) == {"x": 1}
    _, parquet, jsonl = list_data_files("s3://unit/a")
    assert parquet == [] and jsonl == ["unit/a/part.jsonl"]  # _-prefixed names are skipped
    with pytest.raises(ValueError, match="not found"):
        list_data_files("s3://unit/missing")


def test_filter_job_s3_round_trip(patient_ray, tiny_dir, tmp_path, s3_server):
    import boto3
    import pyarrow.dataset as pads

    from raylib.jobs.filter import FilterConfig, run
    from raylib.config import load_config
    from raylib.storage import filesystem_for, read_text

    data, expected = make_input(tmp_path / "in")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="curation")
    for f in data.iterdir():
        s3.upload_file(str(f), "curation", f"input/{f.name}")

    cfg = load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", [
        "input=s3://curation/input/", "output=s3://curation/out", f"model={tiny_dir}", "shard_size=100",
        "top_k=3", "max_chars=300", "read_blocks=1", "consistency=false"])
    summary = run(cfg)

    assert summary["input"] == expected["input"]
    assert summary["rejected_by_reason"] == dict(expected["rejected"])
    assert summary["kept"] == len(expected["good"])  # consistency off: heuristics + dedupe only
    fs, kept_dir = filesystem_for("s3://curation/out/kept")
    kept = pads.dataset(kept_dir, filesystem=fs, format="parquet").to_table()
    assert kept.num_rows == summary["kept"] and "shard" in kept.column_names
    rejects = pads.dataset(filesystem_for("s3://curation/out/rejects")[1], filesystem=fs,
                           format="parquet").to_table()
    assert rejects.num_rows == summary["rejected"]
    assert json.loads(read_text("s3://curation/out/summary.json"))["kept"] == summary["kept"]
