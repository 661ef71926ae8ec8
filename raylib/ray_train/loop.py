"""The one Ray Train loop for contrastive pretraining and finetuning.

`fit(cfg, objective)` prepares the data once (raylib.jobs.prepare: pre-tokenized per-source shards
+ manifest, reused when it matches), plans it from the manifest's row counts
(raylib.ray_train.data), starts a TorchTrainer, and in each worker runs: read this worker's rows of
the step from the shards (a prefetch thread) -> pad the token ids (Objective.features) -> embed + loss with optional gradient caching
(raylib.gradcache) -> grad clip -> AdamW -> WSD schedule; every `checkpoint.every_steps` steps (and at
the end) it reports a checkpoint: a loadable model directory (Encoder.save_pretrained layout) plus
`train_state.pt` (optimizer, scheduler, next step = data position) and `metrics.jsonl`.
A restarted worker group (FailureConfig) or a second fit() with the same name resumes at the exact
next batch. The config sections are raylib.train_config's; the objective (raylib.objectives) is
plain PyTorch and is pickled to the workers as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raylib.gradcache import forward_backward, pad_features
from raylib.model import Encoder, autocast_for
from raylib.schedule import wsd_scheduler
from raylib.storage import join, read_text, write_bytes, write_text
from raylib.train_config import ModelSection, TrainJobConfig, TrainSection

TRAIN_STATE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def is_remote(path: str) -> bool:
    return "://" in path


def run_dir(cfg: TrainJobConfig) -> Path:
    """Rank 0's working directory for metrics.jsonl (published to storage by `fit` at the end; each
    checkpoint carries a copy) and the test switches' logs: the run's own directory on local
    storage; with remote storage `checkpoint.local_dir`, or by default a node-local temp dir named
    for the run (never the driver's working directory: rank 0 may run on another node)."""
    c = cfg.checkpoint
    if not is_remote(c.storage_path):
        return Path(c.storage_path).expanduser().resolve() / c.name
    if c.local_dir:
        return Path(c.local_dir).expanduser().resolve() / c.name
    run_id = hashlib.sha1(f"{c.storage_path.rstrip('/')}/{c.name}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "raylib-runs" / run_id / c.name


# ----------------------------------------------------------------------------- model pieces
def load_encoder(section: ModelSection, seed: int = 0) -> Encoder:
    """The starting Encoder from a name/dir, or a seeded tiny one."""
    if section.name_or_path == "tiny":
        from raylib.tiny import tiny_encoder

        encoder = tiny_encoder(seed=seed, **section.tiny)
    else:
        encoder = Encoder.from_pretrained(section.name_or_path, device="cpu")
    if section.m3_heads and not encoder.has_multivector:
        encoder.add_m3_heads(seed=seed)
    if section.matryoshka_dims:
        encoder.settings.matryoshka_dims = list(section.matryoshka_dims)
    return encoder


def build_optimizer(model: torch.nn.Module, t: TrainSection) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def count_tokens(features: dict[str, dict[str, torch.Tensor]]) -> int:
    return int(sum(int(f["attention_mask"].sum()) for f in features.values()))


def train_flops_per_token(encoder: Encoder, t: TrainSection, activation_checkpointing: bool) -> float:
    """6 N per trained token (forward 2N + backward 4N), N = non-embedding parameters; + 2N for the
    gradient cache's extra forward and + 2N for activation checkpointing's recomputation."""
    n = sum(p.numel() for name, p in encoder.named_parameters() if "embeddings" not in name)
    return n * (6 + (2 if t.grad_cache_chunk else 0) + (2 if activation_checkpointing else 0))


def training_step(model: Any, encoder: Encoder, objective: Any, rows: dict[str, list],
                  optimizer: torch.optim.Optimizer, scheduler: Any, t: TrainSection, device: torch.device,
                  distributed: bool = False, step: int | None = None) -> tuple[dict[str, float], int]:
    """One optimizer step on this worker's rows; returns (metrics of this rank, local tokens).

    `model` is what the objective calls (DDP-wrapped when distributed), `encoder` the bare Encoder;
    `step` (0-based) goes to the objective's optional `begin_step` (M3 warm-up).
    """
    if step is not None and hasattr(objective, "begin_step"):
        objective.begin_step(step)
    features = objective.features(encoder, rows)
    features = {s: {k: v.to(device) for k, v in f.items()} for s, f in features.items()}
    if getattr(objective, "pad_across_workers", False) or t.grad_cache_chunk:
        features = _pad_sides(features, encoder.tokenizer.pad_token_id, distributed and
                              getattr(objective, "pad_across_workers", False))
    use_autocast = t.bf16 and device.type == "cuda"

    def embed(side: str, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast_for(device) if use_autocast else torch.autocast("cpu", enabled=False):
            return objective.embed(model, side, feats)

    no_sync = getattr(model, "no_sync", None)
    loss, metrics = forward_backward(embed, features, lambda reps: objective.loss(reps, features, rows),
                                     t.grad_cache_chunk, no_sync, device)
    if t.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(encoder.parameters(), t.max_grad_norm)
        metrics["grad_norm"] = float(norm)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics, count_tokens(features)


def _pad_sides(features, pad_id: int, across_workers: bool):
    """Pad each side to one length (the longest over workers when across_workers)."""
    lengths = torch.tensor([f["input_ids"].shape[1] for f in features.values()])
    if across_workers:
        import torch.distributed as dist

        lengths = lengths.to(next(iter(features.values()))["input_ids"].device)
        dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
    return {s: pad_features(f, int(n), pad_id) for (s, f), n in zip(features.items(), lengths.tolist())}


def _mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _sum_over_workers(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


# ----------------------------------------------------------------------------- the worker
def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from raylib.ray_train.data import PreparedData, iter_prepared_steps

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
        _truncate_metrics(metrics_path, start_step)
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
                                        distributed=world > 1, step=step)
        metrics["data_wait_s"] = waited  # mean over workers below
        metrics = _mean_over_workers(metrics, device)
        tokens = _sum_over_workers(tokens, device)
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


def check_prepared(manifest: dict, encoder: Encoder, objective: Any) -> None:
    """ValueError unless the prepared token ids are this model's and objective's: same tokenizer
    (vocabulary, prefixes, pad id), same max lengths, the objective's kind of rows."""
    from raylib.ray_data.prepare import tokenizer_identity

    mined = hasattr(objective, "num_negatives")
    want = {"tokenizer": tokenizer_identity(encoder.text_tokenizer), "kind": "mined" if mined else "pairs",
            "query_max_length": objective.query_max_length,
            "document_max_length": objective.document_max_length}
    diff = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
    if diff:
        raise ValueError(f"prepared data does not match the model/objective (manifest, wanted): {diff}; "
                         f"prepare it again (data.prepared empty or another location)")


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


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop metric rows of steps that will be re-run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step]
    path.write_text("".join(r + "\n" for r in rows))


def progress_line(record: dict, total_steps: int) -> str:
    dims = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss@"))
    mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
    return (f"step {record['step']}/{total_steps} loss {record['loss']:.4f} ({dims}) lr {record['lr']:.2e} "
            f"{record['examples_per_s']:.1f} ex/s {record['tokens_per_s']:.0f} tok/s{mfu}")


# ----------------------------------------------------------------------------- the driver
def fit(cfg: TrainJobConfig, objective: Any) -> dict:
    """Plan the data, run the TorchTrainer, plot the curves; returns a summary dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylib.jobs.prepare import prepare_for_training
    from raylib.jobs.ray_env import init_ray
    from raylib.ray_train.data import make_plan
    from raylib.storage import filesystem_for

    s = cfg.scaling
    if s.num_workers < 1:
        raise ValueError(f"scaling.num_workers must be >= 1, got {s.num_workers}")
    if cfg.checkpoint.every_steps < 1:
        raise ValueError(f"checkpoint.every_steps must be >= 1, got {cfg.checkpoint.every_steps}")
    if cfg.data.global_batch_size % s.num_workers:
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by "
                         f"scaling.num_workers {s.num_workers}")
    start = time.time()
    prepared = prepare_for_training(cfg, objective)  # a Ray Data job, or a matching manifest reused
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


def publish_metrics(checkpoint: str, location: str) -> dict[str, str]:
    """Copy metrics.jsonl from the final checkpoint (written on rank 0's node) into the run's
    storage location and plot it there as curves.png: nothing stays on one node's disk."""
    text = read_text(join(checkpoint, METRICS_FILE))
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    write_text(join(location, METRICS_FILE), text)
    out = {"metrics_path": join(location, METRICS_FILE)}
    if rows:
        write_bytes(join(location, "curves.png"), plot_metrics(rows))
        out["curves"] = join(location, "curves.png")
    return out


def plot_metrics(rows: list[dict]) -> bytes:
    """Loss (total and per Matryoshka dim), LR and throughput against step, as PNG bytes (Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss")}):
        axes[0].plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r["examples_per_s"] for r in rows])
    axes[2].set_title("examples/s")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
