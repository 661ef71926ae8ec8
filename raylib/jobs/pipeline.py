"""One pipeline from raw pairs to a served model: data -> filter -> mine -> pretrain (optional)
-> finetune -> evaluate (before/after) -> serve (optional).

  python jobs/pipeline.py --config jobs/configs/pipeline/local.yaml [--set finetune.enabled=false]
  ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline/debug.yaml \
      --set workdir=s3://bucket/run1

Each stage is the stage's own job (`python -m raylib.jobs.<stage> --config ... --set ...`) run as a
child process, so it behaves exactly as when run alone or under `ray job submit`; the stages
share one Ray: the cluster named by RAY_ADDRESS or one local Ray the pipeline starts. The
pipeline gives each stage its output location under `workdir` (local or s3://) and reads the
stage's summary.json from there; a stage whose marker `<workdir>/stages/<stage>.json` exists is skipped (resume). Stage settings may use the
placeholders {workdir}, {model}, {curation_model}, {pairs}, {filtered}, {mined}, {pretrained},
{base}, {finetuned}, {eval_data}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from raylib.config import parse_job_args
from raylib.jobs.summary import finish, read_summary, seconds
from raylib.storage import copy_tree, exists, is_s3, join, read_text, write_text

REPO = Path(__file__).resolve().parents[2]  # stage configs are found relative to the cwd or here


@dataclass
class DataConfig:
    build_demo: bool = True          # build the stdlib-docs demo set into {workdir}/data if missing
    pairs: str = "{workdir}/data/pairs.parquet"
    eval_data: str = "{workdir}/data/beir"
    eval_split: str = "test"


@dataclass
class StageConfig:
    enabled: bool = True
    config: str = ""                 # the stage job's YAML (relative to the cwd or the repository)
    set: list[str] = field(default_factory=list)  # --set overrides (placeholders allowed)


@dataclass
class EvaluateSection:
    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: ["dense"])
    batch_size: int = 64


@dataclass
class ServeSection:
    enabled: bool = True
    port: int = 8000
    keep_running: bool = False       # true: leave the app up (Ctrl-C to stop; always on a cluster)
    config: str = "serve/config.yaml"  # the deploy config whose application args are served (model replaced)


@dataclass
class PipelineConfig:
    workdir: str = "runs/demo"       # the pipeline's output location (local or s3://)
    model: str = "minilm"            # the starting checkpoint (and the default teacher)
    curation_model: str = ""         # filter model and mining teacher ("" = model); Arctic-Embed 2.0
                                     # §2.3 filters with me5-small: curation_model=me5-small
    data: DataConfig = field(default_factory=DataConfig)
    filter: StageConfig = field(default_factory=StageConfig)
    mine: StageConfig = field(default_factory=StageConfig)
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    finetune: StageConfig = field(default_factory=StageConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    serve: ServeSection = field(default_factory=ServeSection)
    local_num_cpus: int = 8          # CPU tokens of the local Ray the stages share (no RAY_ADDRESS)


def training_location(loc: str, name: str) -> list[str]:
    """The --set items of a training stage: checkpoints, metrics and curves under `loc`."""
    return [f"checkpoint.storage_path={loc.rsplit('/', 1)[0]}", f"checkpoint.name={name}"]


# stage -> (placeholder its result fills, the --set items that put its output under workdir)
STAGES = {
    "filter": ("filtered", lambda loc: [f"output={loc}"]),
    "mine": ("mined", lambda loc: [f"output={loc}"]),
    "pretrain": ("pretrained", lambda loc: training_location(loc, "pretrain")),
    "finetune": ("finetuned", lambda loc: training_location(loc, "finetune")),
}


def stage_location(workdir: str, name: str) -> str:
    """Where a stage writes its outputs and summary.json."""
    return join(workdir, "checkpoints", name) if name in ("pretrain", "finetune") else join(workdir, name)


def stage_result(name: str, summary: dict) -> str:
    """What the next stage reads: kept pairs, mined pairs, or the final checkpoint."""
    if name == "filter":
        return summary["outputs"]["kept"]
    if name == "mine":
        return summary["outputs"]["mined"]
    return summary["checkpoint"]


def run_child(name: str, module: str, args: list[str], workdir: str) -> None:
    """Run `python -m raylib.jobs.<module> args`; stderr streams through, stdout is kept in
    <workdir>/logs/<name>.stdout. A failed stage stops the pipeline."""
    print(f"[pipeline] {name}: python -m raylib.jobs.{module} {' '.join(args)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run([sys.executable, "-m", f"raylib.jobs.{module}", *args], stdout=out,
                              env=os.environ.copy())
        out.seek(0)
        write_text(join(workdir, "logs", f"{name}.stdout"), out.read())
    if proc.returncode != 0:
        raise SystemExit(f"[pipeline] stage {name} failed (exit {proc.returncode}); "
                         f"its stdout is in {join(workdir, 'logs', name + '.stdout')}")


def _config_path(path: str) -> str:
    return path if Path(path).exists() or not (REPO / path).exists() else str(REPO / path)


def run_stage(name: str, stage: StageConfig, paths: dict, workdir: str) -> dict:
    """Run one job stage unless its marker says it finished; returns its summary (from storage)."""
    marker = join(workdir, "stages", f"{name}.json")
    if exists(marker):
        print(f"[pipeline] {name}: done before ({marker}), skipped", file=sys.stderr, flush=True)
        return {**json.loads(read_text(marker)), "skipped": True}
    location = stage_location(workdir, name)
    args = ["--config", _config_path(stage.config)]
    for item in [*(s.format(**paths) for s in stage.set), *STAGES[name][1](location)]:
        args += ["--set", item]
    run_child(name, name, args, workdir)
    summary = read_summary(location)
    result = stage_result(name, summary)
    if not result or not exists(result):
        raise SystemExit(f"[pipeline] stage {name} finished but its output {result!r} does not exist")
    write_text(marker, json.dumps(summary, default=str))
    return summary


def evaluate(tag: str, model: str, paths: dict, cfg: EvaluateSection, split: str, workdir: str) -> dict:
    """The evaluation job on the held-out split (skipped when its summary exists)."""
    location = join(workdir, "evaluate", tag)
    if not exists(join(location, "summary.json")):
        run_child(f"evaluate_{tag}", "evaluate", [
            "--set", f"model={model}", "--set", f"data={paths['eval_data']}", "--set", f"split={split}",
            "--set", f"modes={','.join(cfg.modes)}", "--set", f"batch_size={cfg.batch_size}",
            "--set", f"output={location}"], workdir)
    return read_summary(location)


def serve_and_query(model: str, cfg: ServeSection) -> dict:
    """Deploy the Serve app (joining the cluster when there is one), make one OpenAI-style request.
    On a local Ray started here the app is torn down afterwards unless keep_running."""
    import urllib.request

    import ray
    from ray import serve

    from raylib.ray_env import init_ray
    from raylib.ray_serve.app import app as build_app, start_serve
    from raylib.ray_serve.settings import deploy_args

    joined = init_ray(log_to_driver=False)  # the pipeline's own Ray (share_ray) or the cluster
    # a local app is torn down below; on a cluster HAProxy keeps Serve's fixed admin ports
    start_serve(port=cfg.port, drain_s=None if joined else 1, free_admin_ports=not joined)
    args = deploy_args(_config_path(cfg.config)).model_copy(update={"model": model})
    serve.run(build_app(args), name="raylib", route_prefix="/")
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
              "usage": answer.get("usage"), "left_running": joined or cfg.keep_running}
    if cfg.keep_running and not joined:
        print(f"[pipeline] Serve app up at {base} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    if not joined:
        serve.shutdown()
        ray.shutdown()
    return result


def share_ray(num_cpus: int) -> None:
    """Join the cluster (RAY_ADDRESS) or start one local Ray, and let every stage join it through
    RAY_ADDRESS: one Ray start for the whole pipeline instead of one per stage."""
    import ray

    from raylib.ray_env import init_ray

    init_ray(num_cpus, log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def prepare_data(cfg: PipelineConfig, paths: dict) -> dict | None:
    """Build the demo set (locally, then copied to an s3:// workdir) unless the pairs exist."""
    if not cfg.data.build_demo or exists(paths["pairs"]):
        return None
    from raylib.demo_data import build_demo_data

    data_dir = paths["pairs"].rsplit("/", 1)[0]
    if not is_s3(data_dir):
        return build_demo_data(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        info = build_demo_data(tmp)
        copy_tree(tmp, data_dir)
    return info


def run(cfg: PipelineConfig) -> dict:
    """All enabled stages in order; writes <workdir>/summary.json and reports."""
    start = time.time()
    workdir = cfg.workdir if is_s3(cfg.workdir) else str(Path(cfg.workdir).resolve())
    paths = {"workdir": workdir, "model": cfg.model, "curation_model": cfg.curation_model or cfg.model}
    paths["pairs"] = cfg.data.pairs.format(**paths)
    paths["eval_data"] = cfg.data.eval_data.format(**paths)
    stages: dict[str, dict] = {}
    share_ray(cfg.local_num_cpus)
    data = prepare_data(cfg, paths)
    if data is not None:
        stages["data"] = data
    lines = []
    for name, (key, _) in STAGES.items():
        stage: StageConfig = getattr(cfg, name)
        paths["base"] = paths.get("pretrained", cfg.model)
        if stage.enabled:
            summary = run_stage(name, stage, paths, workdir)
            paths[key] = stage_result(name, summary)
            stages[name] = _brief(name, summary)
            lines.append(_line(name, stages[name]))
    final_model = paths.get("finetuned", paths.get("pretrained", cfg.model))
    result: dict = {"workdir": workdir, "stages": stages, "model": final_model}
    if cfg.evaluate.enabled:
        before = evaluate("before", cfg.model, paths, cfg.evaluate, cfg.data.eval_split, workdir)
        after = evaluate("after", final_model, paths, cfg.evaluate, cfg.data.eval_split, workdir)
        result["evaluate"] = {"before": before["results"], "after": after["results"]}
        for mode in before["results"]:
            b, a = before["results"][mode]["ndcg@10"], after["results"][mode]["ndcg@10"]
            lines.append(f"evaluate {mode} nDCG@10 on {before['num_queries']} held-out queries: "
                         f"{b:.4f} -> {a:.4f}")
        card = card_before_after(final_model, cfg.model, before, after)
        if card:
            result["card"] = card
    for name in ("pretrain", "finetune"):
        if name in stages and stages[name].get("tracking"):
            lines.append(f"{name} tracking: {stages[name]['tracking']}")
    if result.get("card") or any(stages.get(n, {}).get("card") for n in ("pretrain", "finetune")):
        lines.append(f"model card: {result.get('card') or stages['finetune' if 'finetune' in stages else 'pretrain']['card']}")
    if cfg.serve.enabled:
        result["serve"] = serve_and_query(final_model, cfg.serve)
        lines.append(f"served: {result['serve']['url']} answered a {result['serve']['dim']}-d embedding")
    result["seconds"] = round(time.time() - start, 1)
    lines.append(f"model: {final_model}; {seconds(result['seconds'])} in all")
    return finish("pipeline", result, workdir, lines)


def _brief(name: str, summary: dict) -> dict:
    """The few numbers of a stage the pipeline's summary keeps (the rest is in its summary.json)."""
    keep = {"filter": ("input", "kept", "rejected", "dropped_by_consistency"),
            "mine": ("counts",), "pretrain": ("checkpoint", "curves", "card", "eval"),
            "finetune": ("checkpoint", "curves", "card", "eval")}
    out = {k: summary.get(k) for k in keep[name]}
    mlflow = (summary.get("tracking") or {}).get("mlflow")
    if mlflow:
        out["tracking"] = mlflow["url"]
    out.update(seconds=summary.get("seconds"), summary=summary.get("summary_path"),
               skipped=summary.get("skipped", False))
    return out


def card_before_after(model: str, base: str, before: dict, after: dict) -> str | None:
    """Add the pipeline's before/after table to the final model's card (when it has one)."""
    from raylib.model_card import CARD_FILE, add_section

    if not exists(join(model, CARD_FILE)):
        return None
    rows = ["| head | metric | before (`" + base + "`) | after |", "|---|---|---|---|"]
    for mode, values in after["results"].items():
        for metric, value in values.items():
            rows.append(f"| {mode} | {metric} | {before['results'].get(mode, {}).get(metric, float('nan')):.4f} "
                        f"| {value:.4f} |")
    body = (f"The pipeline's evaluation on {after['data']} ({after['split']}, {after['num_queries']} queries, "
            f"{after['num_documents']} documents), before and after training:\n\n" + "\n".join(rows))
    return add_section(model, "Before / after (pipeline evaluation)", body)


def _line(name: str, brief: dict) -> str:
    done = " (done before, skipped)" if brief["skipped"] else f" in {seconds(brief['seconds'] or 0)}"
    if name == "filter":
        return f"filter: {brief['input']} pairs in, {brief['kept']} kept{done}"
    if name == "mine":
        c = brief["counts"]
        return f"mine: {c['input']} pairs in, {c['kept']} with hard negatives{done}"
    best = brief.get("eval")
    kept = f"; best {best['metric']} {best['score']:.4f} at step {best['step']}" if best else ""
    return f"{name}: checkpoint {brief['checkpoint']}{done}; curves {brief['curves']}{kept}"


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_job_args(PipelineConfig, __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
