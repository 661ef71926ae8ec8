"""Every job's debug config as a user runs it on a Ray cluster, against one `ray start --head` that
this module starts in a directory holding the demo data (its own ports and temp dir; only its own
processes are stopped): filter, mine, finetune and evaluate as `python jobs/<job>.py --config
jobs/configs/<job>/debug.yaml` drivers on the head (RAY_ADDRESS), pretrain through `ray job submit
--working-dir . -- python jobs/pretrain.py ...`. Each summary is read back from the job's output
location (summary.json) and equals its last stdout line. The pipeline's debug config runs in
tests/test_multinode.py (several Ray nodes, every path on s3://)."""

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

from raylib.config import load_config
from raylib.jobs.summary import read_summary
from raylib.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty directory holding the demo data where the debug configs look for it (runs/demo):
    160 of its functions (256 pairs, 32 held-out queries), as the filter, mine and evaluate debug
    runs embed every text with minilm on the CPU (the whole set: tests/test_multinode.py)."""
    from raylib.demo_data import build_demo_data

    work = tmp_path_factory.mktemp("jobs")
    counts = build_demo_data(work / "runs" / "demo" / "data", num_functions=160)
    assert counts == {"pairs": 256, "eval_queries": 32, "corpus": 160}
    return work


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
def head(workdir):
    """A `ray start --head --block` in `workdir` (the cwd of its workers, as of the drivers), in its
    own process group; SIGTERM to the group stops its cluster."""
    # the cluster's `python` is this venv's, as on a node whose image installs the project
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dash_port = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=8",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats",
           # its own agent ports: the suite's session Ray already holds the defaults (52365, ...),
           # and a head whose job agent cannot bind answers "No available agent to submit job"
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_for_dashboard(url, proc, timeout_s=240)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # the jobs are over: no need to wait out Ray's graceful stop (15 s+)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_job(job: str, workdir: Path, head: dict, *sets: str) -> dict:
    """Run the job's debug config as a driver in `workdir` on the head's cluster; returns its
    summary as read from storage."""
    config = ROOT / "jobs" / "configs" / job / "debug.yaml"
    cmd = [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert f"== {job} ==" in out.stderr  # the human-readable report
    summary = read_summary(str(workdir / output_location(job, config, sets)))
    assert summary == printed and summary["job"] == job
    return summary


def submit(head: dict, args: list[str]) -> tuple[dict, str]:
    """`ray job submit --working-dir . -- python <args>`; returns the job's JSON summary and its logs."""
    cmd = [RAY, "job", "submit", f"--address={head['dashboard']}", "--working-dir", ".", "--",
           "python", *args]
    deadline = time.monotonic() + 180
    while True:  # the head's dashboard answers before its job agent is up: "No available agent"
        out = subprocess.run(cmd, env=head["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout, out.stdout[-3000:]
    summaries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert summaries, out.stdout[-3000:]
    return summaries[-1], out.stdout


def output_location(job: str, config: Path, sets: tuple[str, ...]) -> str:
    """The job's output location, from its own config (what the pipeline relies on)."""
    from importlib import import_module

    module = import_module(f"raylib.jobs.{job}")
    cls = {"filter": "FilterConfig", "mine": "MineJobConfig", "pretrain": "PretrainConfig",
           "finetune": "FinetuneJobConfig", "evaluate": "EvaluateConfig"}[job]
    cfg = load_config(getattr(module, cls), config, list(sets))
    if job in ("pretrain", "finetune"):
        return f"{cfg.checkpoint.storage_path}/{cfg.checkpoint.name}"
    return cfg.output


@pytest.fixture(scope="module")
def mined(workdir, head) -> dict:
    return run_job("mine", workdir, head)


def test_filter_debug(workdir, head):
    s = run_job("filter", workdir, head)
    assert s["input"] == s["rejected"] + sum(s["dropped_by_heuristic"].values()) \
        + s["dropped_by_consistency"] + s["kept"] > 0
    assert (workdir / s["outputs"]["kept"]).is_dir()
    assert not (workdir / s["outputs"]["kept"]).parent.joinpath("_scratch").exists()  # parts removed


def test_mine_debug(mined, workdir):
    assert mined["counts"]["adds_up"] and mined["counts"]["kept"] > 0
    assert (workdir / mined["outputs"]["mined"]).is_dir()
    import pyarrow.parquet as pq

    rows = pq.read_table(workdir / mined["outputs"]["mined"]).to_pylist()
    assert len(rows) == mined["counts"]["kept"] and all(len(r["negatives"]) == 3 for r in rows)
    assert all(r["positive"] not in r["negatives"] for r in rows)


def test_finetune_debug_reads_mined(mined, workdir, head):
    s = run_job("finetune", workdir, head)
    assert s["plan"]["total_steps"] == 10 and s["metrics"]["step"] == 10
    assert (workdir / s["curves"]).read_bytes()[:4] == b"\x89PNG"
    lines = (workdir / s["metrics_path"]).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))


def test_evaluate_debug(workdir, head):
    s = run_job("evaluate", workdir, head)
    assert {"dense", "dense/int8", "dense@128", "dense@128/int8"} <= set(s["results"])
    assert 0 < s["results"]["dense"]["ndcg@10"] <= 1 and s["num_queries"] > 0


def test_pretrain_debug_through_ray_job_submit(head, tmp_path):
    """The repo as the job's working dir (what `ray job submit --working-dir .` uploads), the debug
    config with only its paths moved to this host's absolute tmp dir."""
    run = tmp_path / "run"
    sets = [f"data.paths=[{run}/pairs.parquet]", f"checkpoint.storage_path={run}/ckpt",
            f"checkpoint.local_dir={run}"]
    printed, logs = submit(head, ["jobs/pretrain.py", "--config", "jobs/configs/pretrain/debug.yaml",
                                  *[x for item in sets for x in ("--set", item)]])
    assert "== pretrain ==" in logs
    config = ROOT / "jobs" / "configs" / "pretrain" / "debug.yaml"
    assert read_summary(output_location("pretrain", config, tuple(sets))) == printed
    plan = printed["plan"]
    assert sum(plan["source_rows"].values()) == 640 and len(plan["source_rows"]) == 3
    assert printed["metrics"]["step"] == plan["total_steps"] > 0 and printed["metrics"]["loss"] > 0
    # the job prepared its own data into the run's output (data.prepared empty)
    assert printed["prepared"]["location"] == f"{run}/ckpt/debug/prepared" and not printed["prepared"]["reused"]
    # the checkpoint is on this host's disk (absolute storage_path), a loadable model dir
    from raylib.model import Encoder

    assert printed["checkpoint"].startswith(str(run / "ckpt"))
    encoder = Encoder.from_pretrained(printed["checkpoint"])
    assert encoder.encode_dense(["a query"], kind="query").shape[0] == 1
