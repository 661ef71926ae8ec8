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

import torch

from raylib.model import Encoder
from raylib.objectives import Objective
from raylib.ray_env import init_ray
from raylib.schedule import wsd_scheduler
from raylib.storage import filesystem_for, join
from raylib.train_config import TrainJobConfig
from raylib.train_data import PreparedData, iter_prepared_steps, make_plan
from raylib.training import (METRICS_FILE, TRAIN_STATE, build_optimizer, check_prepared, check_scaling,
                             is_remote, load_encoder, mean_over_workers, progress_line, publish_metrics,
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
    encoder = load_encoder(cfg.model, t.seed)
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
    last_report = None
    tick = time.perf_counter()
    for step, rows, waited in iter_prepared_steps(plan, data, start_step, rank, cfg.data.prefetch):
        if step == t.fail_at_step and rank == 0:
            marker = out_dir / f"failed_at_{step}"
            if not marker.exists():
                marker.write_text("injected failure\n")
                raise RuntimeError(f"injected worker failure at step {step} (train.fail_at_step)")
        torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)  # dropout: a function of (step, rank)
        metrics, tokens = training_step(model, encoder, objective, rows, optimizer, scheduler, t, device,
                                        distributed=world > 1)
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
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % t.log_every == 0 or step + 1 == total_steps:
                print(progress_line(record, total_steps), flush=True)
        done = step + 1 == total_steps
        if (step + 1) % cfg.checkpoint.every_steps == 0 or done:
            last_report = _report(encoder, optimizer, scheduler, step + 1, record, rank, metrics_path, Checkpoint)
        if done:
            break
    if consumed is not None:
        consumed.close()
    if last_report is None and start_step < total_steps:
        raise RuntimeError(f"worker {rank} got no data from step {start_step} on")


def _report(encoder: Encoder, optimizer, scheduler, next_step: int, record: dict, rank: int,
            metrics_path: Path, checkpoint_cls) -> dict:
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
        ray.train.report(record, checkpoint=checkpoint_cls.from_directory(tmp))
    return record


# ----------------------------------------------------------------------------- the driver
def fit(cfg: TrainJobConfig, objective: Objective, prepared: dict) -> dict:
    """Plan the prepared data (a manifest with `location` and `reused`, from
    raylib.jobs.prepare.prepare_for_training), run the TorchTrainer, plot the curves; returns a
    summary dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_scaling(cfg)
    s = cfg.scaling
    start = time.time()
    init_ray(s.ray_num_cpus, s.ray_address or None)
    plan_start = time.time()
    manifest = {k: v for k, v in prepared.items() if k not in ("location", "reused")}
    counts = {source: v["rows"] for source, v in manifest["sources"].items()}
    plan = make_plan(counts, cfg.data.global_batch_size, s.num_workers, cfg.data.seed, cfg.data.epochs,
                     cfg.train.max_steps, cfg.data.source_batch_sizes)
    out = run_dir(cfg)  # created by rank 0 on its node
    storage, storage_fs = cfg.checkpoint.storage_path, None
    if is_remote(storage):  # raylib's S3 filesystem: AWS_ENDPOINT_URL and single-part writes
        storage_fs, storage = filesystem_for(storage)
    else:
        storage = str(Path(storage).expanduser().resolve())
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "objective": objective, "plan": plan, "manifest": manifest,
                           "prepared": prepared["location"], "run_dir": str(out),
                           "prepared_fs": filesystem_for(prepared["location"])[0]},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.checkpoint.name, storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep)))
    result = trainer.fit()
    final = result.checkpoint.path if result.checkpoint is not None else None
    if final is not None and storage_fs is not None:
        final = f"s3://{final}"
    location = join(storage if storage_fs is None else f"s3://{storage}", cfg.checkpoint.name)
    published = publish_metrics(final, location) if final else {}
    return {"checkpoint": final, "output": location, "metrics": result.metrics, **published,
            "plan": plan.summary(), "prepared": {"location": prepared["location"], "reused": prepared["reused"],
                                                 "rows": manifest["rows"], "rejected": manifest["rejected"],
                                                 "seconds": manifest.get("seconds")},
            "seconds": round(time.time() - start, 1), "train_seconds": round(time.time() - plan_start, 1),
            "config": asdict(cfg)}


