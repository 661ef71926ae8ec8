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
from raylib.model_card import write_training_card
from raylib.progress import step_line
from raylib.train_eval import (EVAL_METRICS, EvalSet, beir_eval_set, best_eval, eval_modes,
                               evaluate_during_training, holdout_eval_set)
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
                  distributed: bool = False) -> tuple[dict[str, float], int]:
    """One optimizer step on this worker's rows; returns (metrics of this rank, local tokens).

    `model` is what the objective calls (DDP-wrapped when distributed), `encoder` the bare Encoder.
    """
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
                                        distributed=world > 1)
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


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop metric rows of steps that will be re-run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step]
    path.write_text("".join(r + "\n" for r in rows))


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
    from raylib.ray_train.data import table_rows

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


def progress_line(record: dict, total_steps: int) -> str:
    """The step line without timing (raylib.progress.step_line)."""
    return step_line(record, total_steps, 0.0, 0)


# ----------------------------------------------------------------------------- the driver
def fit(cfg: TrainJobConfig, objective: Any, job: str = "train") -> dict:
    """Plan the data, run the TorchTrainer, plot the curves; returns a summary dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylib.jobs.prepare import prepare_for_training
    from raylib.jobs.ray_env import init_ray
    from raylib.ray_train.data import make_plan
    from raylib.storage import filesystem_for
    from raylib.tracking import open_run

    s = cfg.scaling
    if s.num_workers < 1:
        raise ValueError(f"scaling.num_workers must be >= 1, got {s.num_workers}")
    if cfg.checkpoint.every_steps < 1:
        raise ValueError(f"checkpoint.every_steps must be >= 1, got {cfg.checkpoint.every_steps}")
    if cfg.eval.enabled and cfg.checkpoint.every_steps % cfg.eval.every_n_steps:
        raise ValueError(f"checkpoint.every_steps {cfg.checkpoint.every_steps} must be a multiple of "
                         f"eval.every_n_steps {cfg.eval.every_n_steps}: every checkpoint needs a score")
    if cfg.data.global_batch_size % s.num_workers:
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by "
                         f"scaling.num_workers {s.num_workers}")
    start = time.time()
    prepared = prepare_for_training(cfg, objective)  # a Ray Data job, or a matching manifest reused
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
