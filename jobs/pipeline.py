"""One pipeline from raw pairs to a served model: data -> filter -> mine -> pretrain (optional)
-> finetune -> evaluate (before/after) -> serve (optional).

  python jobs/pipeline.py --config jobs/configs/pipeline/local.yaml [--set finetune.enabled=false]

Each stage is the stage's own job (`jobs/<stage>.py --config ... --set ...`) run as a child
process, so a stage behaves exactly as when run alone or under `ray job submit`. A stage that
finished before is skipped (the pipeline resumes where it stopped). Stage settings may use
the placeholders {workdir}, {model}, {curation_model}, {pairs}, {filtered}, {mined}, {pretrained}, {base},
{finetuned}, {eval_data}. The last stdout line is one JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylib.config import parse_job_args  # noqa: E402


@dataclass
class DataConfig:
    build_demo: bool = True          # build the stdlib-docs demo set into {workdir}/data
    pairs: str = "{workdir}/data/pairs.parquet"
    eval_data: str = "{workdir}/data/beir"
    eval_split: str = "test"


@dataclass
class StageConfig:
    enabled: bool = True
    config: str = ""                 # the stage job's YAML
    set: list[str] = field(default_factory=list)  # --set overrides (placeholders allowed)
    output: str = ""                 # the stage's output path; "" = the checkpoint it reports


@dataclass
class EvaluateConfig:
    enabled: bool = True
    modes: str = "dense"
    batch_size: int = 64


@dataclass
class ServeConfig:
    enabled: bool = True
    port: int = 8000
    keep_running: bool = False       # true: leave the app up (Ctrl-C to stop)


@dataclass
class PipelineConfig:
    workdir: str = "runs/demo"
    model: str = "minilm"            # the starting checkpoint (and the default teacher)
    curation_model: str = ""         # filter model and mining teacher ("" = model); Arctic-Embed 2.0
                                     # §2.3 filters with me5-small: curation_model=me5-small
    data: DataConfig = field(default_factory=DataConfig)
    filter: StageConfig = field(default_factory=StageConfig)
    mine: StageConfig = field(default_factory=StageConfig)
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    finetune: StageConfig = field(default_factory=StageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def run_job(name: str, args: list[str], log_dir: Path) -> dict:
    """Run `python jobs/<name>.py args`, stream its stderr, return its last-line JSON summary."""
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args]
    print(f"[pipeline] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.stdout", "w") as out:
        proc = subprocess.run(cmd, stdout=out, cwd=ROOT, env=os.environ.copy())
    lines = (log_dir / f"{name}.stdout").read_text().strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"[pipeline] stage {name} failed (exit {proc.returncode}); "
                         f"stdout in {log_dir / (name + '.stdout')}")
    for line in reversed(lines):  # Ray may print worker log lines after the job's summary
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise SystemExit(f"[pipeline] stage {name} printed no JSON summary")


def run_stage(name: str, stage: StageConfig, paths: dict, workdir: Path) -> tuple[dict, str]:
    """Run one job stage unless it already succeeded; returns (summary, output path).

    Success is recorded in {workdir}/stages/<name>.json, so a re-run skips finished stages.
    A stage's output is `stage.output` when set, else the checkpoint its summary names.
    """
    marker = workdir / "stages" / f"{name}.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        print(f"[pipeline] {name}: done before ({marker}), skipped", file=sys.stderr, flush=True)
        return {**record["summary"], "skipped": True}, record["output"]
    args = ["--config", str(ROOT / stage.config)]
    for item in stage.set:
        args += ["--set", item.format(**paths)]
    summary = run_job(name, args, workdir / "logs")
    output = stage.output.format(**paths) if stage.output else summary.get("checkpoint")
    if not output or not Path(output).exists():
        raise SystemExit(f"[pipeline] stage {name} finished but its output {output!r} does not exist")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"summary": summary, "output": str(output)}, default=str))
    return summary, str(output)


def evaluate(model: str, paths: dict, cfg: EvaluateConfig, split: str, log_dir: Path, tag: str) -> dict:
    out = Path(paths["workdir"]) / "eval" / f"{tag}.json"
    if out.exists():
        return json.loads(out.read_text())
    return run_job("evaluate", ["--model", model, "--data", paths["eval_data"], "--split", split,
                                "--modes", cfg.modes, "--batch-size", str(cfg.batch_size),
                                "--output", str(out)], log_dir / tag)


def serve_and_query(model: str, cfg: ServeConfig) -> dict:
    """Start the Serve app on 127.0.0.1, make one OpenAI-style request, report it."""
    import urllib.request

    import ray
    from ray import serve

    from serve.app import app as build_app

    ray.init(runtime_env={"working_dir": str(ROOT), "excludes": ["runs/", ".venv/", ".git/"]},
             num_cpus=max(os.cpu_count() or 2, 4), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app({"model": model}), name="raylib", route_prefix="/")
    base = f"http://127.0.0.1:{cfg.port}"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=120) as response:
        served_name = json.loads(response.read())["data"][0]["id"]
    url = f"{base}/v1/embeddings"
    body = json.dumps({"input": ["How do I parse a JSON string?"], "model": served_name}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    vector = answer["data"][0]["embedding"]
    result = {"url": url, "dim": len(vector), "first_values": [round(v, 4) for v in vector[:4]],
              "usage": answer.get("usage")}
    print(f"[pipeline] served answer from {url}: dim {len(vector)}, {vector[:4]}", file=sys.stderr)
    if cfg.keep_running:
        print(f"[pipeline] Serve app up at http://127.0.0.1:{cfg.port} (Ctrl-C to stop)", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    ray.shutdown()
    return result


def main() -> dict:
    cfg = parse_job_args(PipelineConfig, __doc__.split("\n")[0])
    start = time.time()
    workdir = Path(cfg.workdir).resolve()
    paths = {"workdir": str(workdir), "model": cfg.model, "curation_model": cfg.curation_model or cfg.model}
    paths["pairs"] = cfg.data.pairs.format(**paths)
    paths["eval_data"] = cfg.data.eval_data.format(**paths)
    log_dir = workdir / "logs"
    summary: dict = {"workdir": str(workdir), "stages": {}}
    if cfg.data.build_demo and not Path(paths["pairs"]).exists():
        from raylib.demo_data import build_demo_data

        summary["stages"]["data"] = build_demo_data(Path(paths["pairs"]).parent)
    keys = {"filter": "filtered", "mine": "mined", "pretrain": "pretrained", "finetune": "finetuned"}
    for name, key in keys.items():
        stage: StageConfig = getattr(cfg, name)
        paths["base"] = paths.get("pretrained", cfg.model)
        if stage.enabled:
            summary["stages"][name], paths[key] = run_stage(name, stage, paths, workdir)
    final_model = paths.get("finetuned", paths.get("pretrained", cfg.model))
    if cfg.evaluate.enabled:
        before = evaluate(cfg.model, paths, cfg.evaluate, cfg.data.eval_split, log_dir, "before")
        after = evaluate(final_model, paths, cfg.evaluate, cfg.data.eval_split, log_dir, "after")
        summary["evaluate"] = {"before": before["results"], "after": after["results"]}
    if cfg.serve.enabled:
        summary["serve"] = serve_and_query(final_model, cfg.serve)
    summary["model"] = final_model
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
