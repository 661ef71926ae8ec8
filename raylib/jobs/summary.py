"""The one summary convention of every job: `<output>/summary.json` (local path or s3://), the same
JSON as the job's last stdout line, and a short human-readable report on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from raylib.storage import join, read_text, write_text

SUMMARY_FILE = "summary.json"


def summary_path(output: str) -> str:
    """Where a job whose output location is `output` writes its summary."""
    return join(output, SUMMARY_FILE)


def finish(job: str, summary: dict[str, Any], output: str, lines: list[str]) -> dict[str, Any]:
    """Write `summary` to `<output>/summary.json`, print `lines` (the human report) to stderr and
    the summary as one JSON line to stdout; returns the summary with `summary_path` added."""
    summary = {"job": job, **summary, "summary_path": summary_path(output)}
    text = json.dumps(summary, default=str)
    write_text(summary["summary_path"], text + "\n")
    print(f"\n== {job} ==", file=sys.stderr)
    for line in lines + [f"summary: {summary['summary_path']}"]:
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()
    print(text, flush=True)
    return summary


def config_errors_exit(run: Callable[[Any], dict], cfg: Any) -> dict:
    """`run(cfg)`, with a ValueError (a user error in the config or its data) ending the process
    as `config error: ...` instead of a traceback."""
    try:
        return run(cfg)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def read_summary(output: str) -> dict[str, Any]:
    """The summary a job wrote into its output location (local path or s3://)."""
    return json.loads(read_text(summary_path(output)))


def seconds(value: float) -> str:
    """12.3 -> '12 s', 75 -> '1 min 15 s' (human report)."""
    value = float(value)
    return f"{value:.0f} s" if value < 60 else f"{int(value // 60)} min {value % 60:.0f} s"


def finish_training(job: str, cfg: Any, result: dict[str, Any]) -> dict[str, Any]:
    """`finish` for the Ray Train jobs: the summary goes to the run's storage location; the
    tracking run (raylib.tracking) gets TensorBoard files, the curves, summary and card."""
    from raylib import tracking

    result = {k: v for k, v in result.items() if k != "config"}
    run = result.pop("mlflow_run", None)
    rows = [json.loads(x) for x in read_text(result["metrics_path"]).splitlines() if x.strip()] \
        if result.get("metrics_path") else []
    tb = None
    if cfg.tracking.tensorboard.enabled:
        tb = tracking.write_tensorboard(rows, cfg.tracking.tensorboard.log_dir or join(result["output"], "tensorboard"))
    result["tracking"] = tracking.summarize(run, tb)
    m, plan = result.get("metrics") or {}, result["plan"]
    lines = [f"{plan['total_steps']} steps of {plan['global_batch_size']} on {plan['num_workers']} "
             f"worker(s) from {len(plan['source_rows'])} source(s); {seconds(result['seconds'])}",
             f"last step: loss {m.get('loss', float('nan')):.4f}, lr {m.get('lr', 0):.2e}, "
             f"{m.get('examples_per_s', 0)} examples/s"]
    best = result.get("eval")
    if best:
        evals = [r.get("eval_s", 0) for r in rows if "eval_s" in r]
        lines.append(f"best {best['metric']} {best['score']:.4f} at step {best['step']} (kept steps "
                     f"{best['kept']}; {len(evals)} evaluations, {sum(evals) / max(len(evals), 1):.1f} s each)")
    lines += [f"checkpoint: {result['checkpoint']}", f"training curves: {result.get('curves')}",
              f"model card: {result.get('card')}"]
    if run is not None:
        lines.append(f"MLflow run: {run.url}")
    if tb:
        lines.append(f"TensorBoard: tensorboard --logdir {tb}")
    summary = finish(job, result, result["output"], lines)
    if run is not None:
        artifacts = {"summary.json": read_text(summary["summary_path"])}
        if result.get("curves"):
            from raylib.storage import read_bytes

            artifacts["curves.png"] = read_bytes(result["curves"])
        if result.get("card"):
            artifacts["README.md"] = read_text(result["card"])
        tags = {"best_step": str(best["step"]), "best_score": str(best["score"])} if best else {}
        run.finish(artifacts, tags)
    return summary
