"""The one Ray Train loop for contrastive pretraining and finetuning (Ray glue).

`fit(cfg, objective, prepared)` plans the prepared data (pre-tokenized per-source shards +
manifest, written by the prepare job: raylib.jobs.prepare.prepare_for_training) from the manifest's
row counts (raylib.train_data), starts a TorchTrainer, and in each worker runs: read this worker's
rows of the step from the shards (a prefetch thread) -> raylib.training.training_step (pad, embed +
loss with optional gradient caching, clip, AdamW, WSD schedule); every `checkpoint.every_steps`
steps (and at the end) it reports a checkpoint: a loadable model directory (Encoder.save_pretrained
layout) plus `train_state.pt` (optimizer, scheduler, next step = data position) and
`metrics.jsonl`. A restarted worker group (FailureConfig) or a second fit() with the same name
resumes at the exact next batch. The config sections are raylib.train_config's; the objective
(raylib.objectives) is plain PyTorch and is pickled to the workers as it is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raylib.model import Encoder
from raylib.model_card import write_training_card
from raylib.objectives import Objective
from raylib.progress import step_line
from raylib.ray_env import init_ray
from raylib.train_eval import (EVAL_METRICS, EvalSet, beir_eval_set, best_eval, eval_modes,
                               evaluate_during_training, holdout_eval_set)
from raylib.schedule import wsd_scheduler
from raylib.storage import filesystem_for, join, read_text
from raylib.train_config import TrainJobConfig
from raylib.train_data import PreparedData, iter_prepared_steps, make_plan
from raylib.training import (METRICS_FILE, TRAIN_STATE, build_optimizer, check_prepared, check_scaling,
                             is_remote, build_encoder, mean_over_workers, publish_metrics,
                             run_dir, sum_over_workers, train_flops_per_token, training_step,
                             truncate_metrics)


# ----------------------------------------------------------------------------- the worker
def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg: TrainJobConfig = config["cfg"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    out_dir = Path(config["run_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    torch.manual_seed(t.seed)
    encoder = build_encoder(cfg.model, t.seed)
    if cfg.model.activation_checkpointing:
        encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.train()
    optimizer_model = encoder
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=False)
            encoder.load_state_dict(state["model"])
            start_step = int(state["next_step"])
            if rank == 0 and (Path(ckpt_dir) / METRICS_FILE).exists():  # rank 0 may be on a new node
                shutil.copy(Path(ckpt_dir) / METRICS_FILE, out_dir / METRICS_FILE)
    objective = config["objective"]
    if world > 1:
        # heads the objective does not use (a dense-only objective on a model with M3 heads) need
        # find_unused_parameters; an objective may say so itself.
        unused = getattr(objective, "find_unused_parameters", encoder.has_sparse or encoder.has_multivector)
        model = ray.train.torch.prepare_model(encoder, parallel_strategy_kwargs={
            "find_unused_parameters": bool(unused)})
        encoder = model.module
    else:
        model = encoder = encoder.to(device)
    optimizer = build_optimizer(optimizer_model, t)
    total_steps = config["plan"].total_steps
    scheduler = wsd_scheduler(optimizer, total_steps, t.warmup, t.decay, t.min_lr_ratio)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    flops_per_token = train_flops_per_token(encoder, t, cfg.model.activation_checkpointing)
    metrics_path = out_dir / METRICS_FILE
    if rank == 0:
        truncate_metrics(metrics_path, start_step)
    consumed = open(out_dir / f"consumed_rank{rank}.jsonl", "a") if t.log_consumed else None
    plan = config["plan"]
    if plan.num_workers != world:
        raise RuntimeError(f"the data plan is for {plan.num_workers} workers, the group has {world}")
    data = PreparedData(config["manifest"], config["prepared"], config["prepared_fs"])
    check_prepared(data.manifest, encoder, objective)
    run = RunSide(cfg, objective, encoder, data, config, metrics_path) if rank == 0 else None
    last_report = None
    tick = attempt_start = time.perf_counter()
    for step, rows, waited in iter_prepared_steps(plan, data, start_step, rank, cfg.data.prefetch):
        if step == t.fail_at_step and rank == 0:
            marker = out_dir / f"failed_at_{step}"
            if not marker.exists():
                marker.write_text("injected failure\n")
                raise RuntimeError(f"injected worker failure at step {step} (train.fail_at_step)")
        torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)  # dropout: a function of (step, rank)
        metrics, tokens = training_step(model, encoder, objective, rows, optimizer, scheduler, t, device,
                                        distributed=world > 1, step=step)
        metrics["data_wait_s"] = waited  # mean over workers below
        metrics = mean_over_workers(metrics, device)
        tokens = sum_over_workers(tokens, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, tick = now - tick, now
        record = {"step": step + 1, **{k: round(v, 6) for k, v in metrics.items()},
                  "examples_per_s": round(len(rows["id"]) * world / seconds, 2),
                  "tokens_per_s": round(tokens / seconds, 1), "step_s": round(seconds, 4),
                  "time": round(time.time(), 3)}
        if device.type == "cuda":
            record["mfu"] = round(tokens * flops_per_token / seconds / (t.peak_tflops * 1e12 * world), 4)
            record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        if consumed is not None and "id" in rows:
            consumed.write(json.dumps({"step": step, "ids": rows["id"]}) + "\n")
            consumed.flush()
        done = step + 1 == total_steps
        evaluate = cfg.eval.enabled and ((step + 1) % cfg.eval.every_n_steps == 0 or done)
        if rank == 0:
            if evaluate:  # the other ranks wait at the report barrier below
                record.update(run.evaluate(encoder))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            run.log(record)
            if (step + 1) % t.log_every == 0 or done or evaluate:
                print(step_line(record, total_steps, time.perf_counter() - attempt_start, step + 1 - start_step),
                      flush=True)
        if (step + 1) % cfg.checkpoint.every_steps == 0 or done or evaluate:
            card = run.card(encoder, step + 1, total_steps) if rank == 0 else None
            last_report = _report(encoder, optimizer, scheduler, step + 1, record, rank, metrics_path, Checkpoint,
                                  card)
        if done:
            break
    if consumed is not None:
        consumed.close()
    if last_report is None and start_step < total_steps:
        raise RuntimeError(f"worker {rank} got no data from step {start_step} on")


def _report(encoder: Encoder, optimizer, scheduler, next_step: int, record: dict, rank: int,
            metrics_path: Path, checkpoint_cls, card=None) -> dict:
    """ray.train.report on every rank (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(record, checkpoint=None)
        return record
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save_pretrained(tmp)
        torch.save({"model": encoder.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "next_step": next_step},
                   Path(tmp) / TRAIN_STATE)
        if metrics_path.exists():
            shutil.copy(metrics_path, Path(tmp) / METRICS_FILE)
        if card is not None:
            write_training_card(tmp, card)
        ray.train.report(record, checkpoint=checkpoint_cls.from_directory(tmp))
    return record


class RunSide:
    """Rank 0's extras: the evaluator (raylib.train_eval), live MLflow logging (raylib.tracking)
    and the model card of each checkpoint (raylib.model_card)."""

    def __init__(self, cfg: TrainJobConfig, objective: Any, encoder: Encoder, data: Any, config: dict,
                 metrics_path: Path):
        from raylib.tracking import LiveLogger

        self.cfg, self.objective, self.manifest = cfg, objective, config["manifest"]
        self.job = config.get("job", "train")
        self.log = LiveLogger(config.get("mlflow_run"))
        self.eval_set, self.modes = None, []
        if cfg.eval.enabled:
            self.eval_set = load_eval_set(cfg.eval, data, config.get("holdout") or {})
            self.modes = eval_modes(encoder, objective, cfg.eval.modes)
        self.metrics_path = metrics_path

    def evaluate(self, encoder: Encoder) -> dict[str, float]:
        metrics = tuple(dict.fromkeys([*EVAL_METRICS, self.cfg.eval.metric]))
        return evaluate_during_training(encoder, self.eval_set, self.modes, metrics, self.cfg.eval.batch_size)

    def card(self, encoder: Encoder, step: int, total_steps: int):
        from raylib.model_card import training_card_info

        heads = ["dense"] + (["sparse", "multivector"] if encoder.has_sparse and encoder.has_multivector else [])
        info = training_card_info(self.cfg, self.job, self.objective, self.manifest, encoder.settings,
                                  encoder.dim, heads, step, total_steps)
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        info.evaluations = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")}
                            for r in rows if any(k.startswith("eval/") for k in r)]
        info.best = best_eval(rows, self.cfg.eval.score_attribute, self.cfg.eval.order)
        run = self.log.run
        info.tracking = run.url if run is not None else ""
        return info


def load_eval_set(section: Any, data: Any, holdout: dict[str, list[int]]) -> EvalSet:
    """The eval set of `section`: a BEIR dir (local or s3://) or the held-out prepared rows."""
    if section.data:
        from raylib.beir import load_beir_uri

        return beir_eval_set(load_beir_uri(section.data, section.split), section.max_queries)
    from raylib.train_data import table_rows

    rows: dict[str, list] = {}
    for source, (start, stop) in sorted(holdout.items()):
        part = table_rows(data.read_run(source, start, stop), source)
        for k, v in part.items():
            rows.setdefault(k, []).extend(v)
    return holdout_eval_set(rows, section.max_queries)


def holdout_split(counts: dict[str, int], fraction: float) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(rows each source trains on, {source: [start, stop)} held out): the last `fraction` of each
    source's prepared (seeded) order is never planned for training."""
    if fraction <= 0:
        return counts, {}
    held = {s: int(n * fraction) for s, n in counts.items()}
    if not sum(held.values()):
        raise ValueError(f"eval.holdout {fraction} of {counts} rows holds out nothing; raise it")
    return {s: n - held[s] for s, n in counts.items()}, {s: [n - held[s], n] for s, n in counts.items() if held[s]}


# ----------------------------------------------------------------------------- the driver
def fit(cfg: TrainJobConfig, objective: Objective, prepared: dict, job: str = "train") -> dict:
    """Plan the prepared data (a manifest with `location` and `reused`, from
    raylib.jobs.prepare.prepare_for_training), run the TorchTrainer, plot the curves; returns a
    summary dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylib.tracking import open_run

    check_scaling(cfg)
    if cfg.eval.enabled and cfg.checkpoint.every_steps % cfg.eval.every_n_steps:
        raise ValueError(f"checkpoint.every_steps {cfg.checkpoint.every_steps} must be a multiple of "
                         f"eval.every_n_steps {cfg.eval.every_n_steps}: every checkpoint needs a score")
    s = cfg.scaling
    start = time.time()
    init_ray(s.ray_num_cpus, s.ray_address or None)
    plan_start = time.time()
    manifest = {k: v for k, v in prepared.items() if k not in ("location", "reused")}
    counts = {source: v["rows"] for source, v in manifest["sources"].items()}
    counts, holdout = holdout_split(counts, cfg.eval.holdout if cfg.eval.enabled else 0.0)
    plan = make_plan(counts, cfg.data.global_batch_size, s.num_workers, cfg.data.seed, cfg.data.epochs,
                     cfg.train.max_steps, cfg.data.source_batch_sizes)
    out = run_dir(cfg)  # created by rank 0 on its node
    storage, storage_fs = cfg.checkpoint.storage_path, None
    if is_remote(storage):  # raylib's S3 filesystem: AWS_ENDPOINT_URL and single-part writes
        storage_fs, storage = filesystem_for(storage)
    else:
        storage = str(Path(storage).expanduser().resolve())
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    mlflow_run = open_run(cfg.tracking, cfg.checkpoint.storage_path, cfg.checkpoint.name, asdict(cfg))
    e = cfg.eval
    scored = {"checkpoint_score_attribute": e.score_attribute, "checkpoint_score_order": e.order} if e.enabled else {}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "objective": objective, "plan": plan, "manifest": manifest,
                           "prepared": prepared["location"], "run_dir": str(out),
                           "prepared_fs": filesystem_for(prepared["location"])[0], "holdout": holdout,
                           "mlflow_run": mlflow_run, "job": job},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.checkpoint.name, storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep, **scored)))
    try:
        result = trainer.fit()
    except BaseException:
        if mlflow_run is not None:
            mlflow_run.finish({}, status="FAILED")
        raise
    uri = (lambda c: None if c is None else f"s3://{c.path}" if storage_fs is not None else c.path)
    last = final = uri(result.checkpoint)
    location = join(storage if storage_fs is None else f"s3://{storage}", cfg.checkpoint.name)
    published = publish_metrics(final, location) if final else {}
    best = best_checkpoint(result, e.score_attribute, e.order, uri) if e.enabled and final else None
    if best is not None and e.load_best:
        final = best["checkpoint"]
    card = finish_card(final, location, best, mlflow_run) if final else None
    return {"checkpoint": final, "last_checkpoint": last, "output": location, "metrics": result.metrics,
            **published, "eval": best, "card": card, "mlflow_run": mlflow_run, "holdout": holdout,
            "plan": plan.summary(), "prepared": {"location": prepared["location"], "reused": prepared["reused"],
                                                 "rows": manifest["rows"], "rejected": manifest["rejected"],
                                                 "seconds": manifest.get("seconds")},
            "seconds": round(time.time() - start, 1), "train_seconds": round(time.time() - plan_start, 1),
            "config": asdict(cfg)}


def best_checkpoint(result: Any, attribute: str, order: str, uri: Any) -> dict | None:
    """The best checkpoint Ray Train kept by `attribute` (step, score, path)."""
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if attribute in m]
    if not kept:
        return None
    sign = 1.0 if order == "max" else -1.0
    checkpoint, metrics = max(kept, key=lambda cm: (sign * cm[1][attribute], -cm[1]["step"]))
    return {"step": int(metrics["step"]), "score": float(metrics[attribute]), "metric": attribute,
            "checkpoint": uri(checkpoint), "kept": sorted(int(m["step"]) for _, m in kept)}


def finish_card(final: str, location: str, best: dict | None, mlflow_run: Any) -> str:
    """Re-render the final model's card with the whole run's evaluations, best step and tracking
    link (into the final checkpoint and <output>/README.md); returns the output copy's path."""
    from raylib.model_card import read_card_info, write_training_card

    info = read_card_info(final)
    rows = [json.loads(line) for line in read_text(join(location, METRICS_FILE)).splitlines() if line.strip()]
    info.evaluations = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")}
                        for r in rows if any(k.startswith("eval/") for k in r)]
    if best is not None:
        info.best = {k: best[k] for k in ("step", "score", "metric")}
    info.tracking = mlflow_run.url if mlflow_run is not None else ""
    write_training_card(final, info)
    return write_training_card(location, info)
