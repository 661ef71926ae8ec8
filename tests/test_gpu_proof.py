"""bench/gpu/run.sh --cpu-smoke: the GPU proof's four checks (filter, search, train, serve) at toy
size on the CPU, through the same script a GPU host runs, so it cannot rot between GPU runs.
With a built kit (.gpu-kit, `make gpu-kit`) the script also installs every wheel of it for
Python 3.12 into a temporary target; without one (CI) it says so in gpu.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_sh_cpu_smoke_all_four_checks_ok(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_PROOF_TIMEOUT_S": "840"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=880)
    assert (tmp_path / "gpu.json").exists(), (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    report = json.loads((tmp_path / "gpu.json").read_text())
    summary = {k: (v["ok"], (v["error"] or "")[-800:]) for k, v in report["checks"].items()}
    assert proc.returncode == 0, (summary, proc.stderr[-3000:])
    assert report["mode"] == "cpu-smoke" and report["all_ok"], summary
    assert set(report["checks"]) == {"filter", "search", "train", "serve"}
    kit = report["kit"]
    if any((ROOT / ".gpu-kit").glob("*.whl")):
        assert "installed" in kit, kit
    else:
        assert kit.startswith("absent"), kit
    figures = {k: v["figures"] for k, v in report["checks"].items()}
    assert figures["filter"]["pairs"] >= 1000 and figures["filter"]["texts_per_s"] > 0
    assert figures["search"]["backend"] == "torch" and figures["search"]["equal_to_faiss_cpu"] is True
    assert figures["search"]["sample_rank_mismatches"] == 0
    assert figures["train"]["steps"] >= 1 and figures["train"]["tokens_per_s"] > 0
    assert figures["serve"]["c1"]["p50_ms"] > 0 and figures["serve"]["c64"]["texts_per_s"] > 0
