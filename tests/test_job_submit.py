"""`ray job submit --working-dir . -- python jobs/pretrain.py ...` against a local `ray start --head`
that this test starts (its own ports and temp dir) and stops (only its own processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
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
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ray_job_submit_pretrain(head_node, tmp_path):
    url, env = head_node
    run = tmp_path / "run"
    cmd = [RAY, "job", "submit", f"--address={url}", "--working-dir", ".", "--",
           "python", "jobs/pretrain.py", "--config", "jobs/configs/pretrain/debug.yaml",
           "--set", f"data.paths=[{run}/pairs.parquet]", "--set", f"checkpoint.storage_path={run}/ckpt",
           "--set", f"checkpoint.local_dir={run}", "--set", "synthetic.rows=192",
           "--set", "data.epochs=1"]
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
    summary = summaries[-1]
    plan = summary["plan"]
    assert sum(plan["source_rows"].values()) == 192 and plan["total_steps"] >= 4
    assert summary["metrics"]["step"] == plan["total_steps"] and summary["metrics"]["loss"] > 0
    # The checkpoint is on this host's disk (absolute storage_path), a loadable model dir.
    from raylib.model import Encoder

    assert summary["checkpoint"].startswith(str(run / "ckpt"))
    encoder = Encoder.from_pretrained(summary["checkpoint"])
    assert encoder.encode_dense(["a query"], kind="query").shape[0] == 1
