"""`ray job submit --working-dir . -- python jobs/<job>.py ...` (pretrain, filter, mine) against a
local `ray start --head` that this module starts (its own ports and temp dir) and stops (only its
own processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from raylib.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")



def wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout_s} s")


@pytest.fixture(scope="module")
def head_node():
    """A `ray start --head --block` in its own process group; SIGTERM to it stops its cluster."""
    # the cluster's `python` is this venv's, as on a node whose image installs the project
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
    dash_port = free_port()
    cmd = [RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=8",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats",
           # its own agent ports: the suite's session Ray already holds the defaults (52365, ...),
           # and a head whose job agent cannot bind answers "No available agent to submit job"
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    head = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_for_dashboard(url, head, timeout_s=240)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)  # the jobs are over: no need to wait out Ray's graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def submit(url: str, env: dict, args: list[str]) -> dict:
    """Submit `python <args>` with the repo as working dir; returns the job's JSON summary."""
    cmd = [RAY, "job", "submit", f"--address={url}", "--working-dir", ".", "--", "python", *args]
    deadline = time.monotonic() + 180
    while True:  # the head's dashboard answers before its job agent is up: "No available agent"
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout, out.stdout[-3000:]
    summaries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert summaries, out.stdout[-3000:]
    return summaries[-1]


def write_pairs(path: Path, n: int = 40) -> Path:
    """n distinct (query, document) pairs over a few topics, one source and language."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = "river protein galaxy harbor engine music cloud forest".split()
    queries = [f"question {i} about the {topics[i % 8]}" for i in range(n)]
    docs = [f"document {i}: the {topics[i % 8]} and the {topics[(i * 3) % 8]} at length" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query": queries, "document": docs, "source": ["s"] * n,
                             "language": ["en"] * n}), path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from raylib.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("submit") / "tiny", pooling="mean")


@pytest.mark.slow
def test_ray_job_submit_pretrain(head_node, tmp_path):
    url, env = head_node
    run = tmp_path / "run"
    summary = submit(url, env, [
        "jobs/pretrain.py", "--config", "jobs/configs/pretrain/debug.yaml",
        "--set", f"data.paths=[{run}/pairs.parquet]", "--set", f"checkpoint.storage_path={run}/ckpt",
        "--set", f"checkpoint.local_dir={run}", "--set", "synthetic.rows=192",
        "--set", "data.epochs=1"])
    plan = summary["plan"]
    assert sum(plan["source_rows"].values()) == 192 and plan["total_steps"] >= 4
    assert summary["metrics"]["step"] == plan["total_steps"] and summary["metrics"]["loss"] > 0
    # The checkpoint is on this host's disk (absolute storage_path), a loadable model dir.
    from raylib.model import Encoder

    assert summary["checkpoint"].startswith(str(run / "ckpt"))
    encoder = Encoder.from_pretrained(summary["checkpoint"])
    assert encoder.encode_dense(["a query"], kind="query").shape[0] == 1


@pytest.mark.slow
def test_ray_job_submit_filter(head_node, tiny_model, tmp_path):
    url, env = head_node
    pairs = write_pairs(tmp_path / "in" / "pairs.parquet")
    summary = submit(url, env, [
        "jobs/filter.py", "--config", "jobs/configs/filter/debug.yaml", "--set", f"input={pairs}",
        "--set", f"output={tmp_path}/filter", "--set", f"model={tiny_model}", "--set", "shard_size=20", "--set", "top_k=3"])
    assert summary["input"] == 40 and summary["shards"]["count"] == 2
    assert summary["rejected"] + sum(summary["dropped_by_heuristic"].values()) \
        + summary["dropped_by_consistency"] + summary["kept"] == 40
    assert json.loads((tmp_path / "filter" / "summary.json").read_text()) == summary
    assert not (tmp_path / "filter" / "_scratch").exists()  # shard parts removed after success


@pytest.mark.slow
def test_ray_job_submit_mine(head_node, tiny_model, tmp_path):
    url, env = head_node
    pairs = write_pairs(tmp_path / "in" / "pairs.parquet")
    summary = submit(url, env, [
        "jobs/mine.py", "--config", "jobs/configs/mine/debug.yaml", "--set", f"input.path={pairs}",
        "--set", f"teacher={tiny_model}", "--set", "candidates=10", "--set", "num_negatives=2",
        # a random tiny teacher scores every document alike, so TopK-PercPos would drop every
        # query (all above 0.95 x positive); the rank window always has 9 non-positives to sample
        "--set", "strategy=rank_window", "--set", "range_max=10", "--set", f"output={tmp_path}/mine"])
    counts = summary["counts"]
    assert counts["input"] == 40 and counts["adds_up"] and counts["kept"] == 40
    import pyarrow.parquet as pq

    mined = pq.read_table(tmp_path / "mine" / "mined").to_pylist()
    assert len(mined) == counts["kept"] and all(len(r["negatives"]) == 2 for r in mined)
    assert all(r["positive"] not in r["negatives"] for r in mined)
