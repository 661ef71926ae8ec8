"""Every job's debug config as the user runs it: `python jobs/<job>.py --config
jobs/configs/<job>/debug.yaml` in a subprocess, its summary read back from the job's output
location (summary.json) and equal to its last stdout line. The pipeline's debug config runs in
tests/test_multinode.py (several Ray nodes, every path on s3://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylib.config import load_config
from raylib.jobs.summary import read_summary

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty directory holding the demo data where the debug configs look for it (runs/demo)."""
    from raylib.demo_data import build_demo_data

    work = tmp_path_factory.mktemp("jobs")
    build_demo_data(work / "runs" / "demo" / "data")
    return work


def run_job(job: str, workdir: Path, *sets: str) -> dict:
    """Run the job's debug config in `workdir`; returns its summary as read from storage."""
    config = ROOT / "jobs" / "configs" / job / "debug.yaml"
    cmd = [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each job starts its own Ray
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert f"== {job} ==" in out.stderr  # the human-readable report
    summary = read_summary(str(workdir / output_location(job, config, sets)))
    assert summary == printed and summary["job"] == job
    return summary


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
def mined(workdir) -> dict:
    return run_job("mine", workdir)


def test_filter_debug(workdir):
    s = run_job("filter", workdir)
    assert s["input"] == s["rejected"] + sum(s["dropped_by_heuristic"].values()) \
        + s["dropped_by_consistency"] + s["kept"] > 0
    assert (workdir / s["outputs"]["kept"]).is_dir()


def test_mine_debug(mined, workdir):
    assert mined["counts"]["adds_up"] and mined["counts"]["kept"] > 0
    assert (workdir / mined["outputs"]["mined"]).is_dir()


def test_finetune_debug_reads_mined(mined, workdir):
    s = run_job("finetune", workdir)
    assert s["plan"]["total_steps"] == 10 and s["metrics"]["step"] == 10
    assert (workdir / s["curves"]).read_bytes()[:4] == b"\x89PNG"
    lines = (workdir / s["metrics_path"]).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))


def test_pretrain_debug(workdir):
    s = run_job("pretrain", workdir)
    assert s["metrics"]["step"] == s["plan"]["total_steps"] > 0
    assert Path(s["checkpoint"]).is_absolute() and (Path(s["checkpoint"]) / "config.json").exists()


def test_evaluate_debug(workdir):
    s = run_job("evaluate", workdir)
    assert {"dense", "dense/int8", "dense@128", "dense@128/int8"} <= set(s["results"])
    assert 0 < s["results"]["dense"]["ndcg@10"] <= 1 and s["num_queries"] > 0
