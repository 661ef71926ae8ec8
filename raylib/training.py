"""The training step and what surrounds it, plain PyTorch (no Ray): the starting Encoder, AdamW,
one optimizer step (pad -> embed + loss with optional gradient caching -> clip -> step -> WSD
schedule), the check that prepared data fits the model, the run's metrics file and its curves.
raylib.ray_train.loop runs these inside Ray Train workers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from raylib.gradcache import forward_backward, pad_features
from raylib.model import Encoder, autocast_for
from raylib.prepare import tokenizer_identity
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



def check_scaling(cfg: TrainJobConfig) -> None:
    """ValueError unless the workers, checkpoint cadence and global batch fit together."""
    s = cfg.scaling
    if s.num_workers < 1:
        raise ValueError(f"scaling.num_workers must be >= 1, got {s.num_workers}")
    if cfg.checkpoint.every_steps < 1:
        raise ValueError(f"checkpoint.every_steps must be >= 1, got {cfg.checkpoint.every_steps}")
    if cfg.data.global_batch_size % s.num_workers:
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by "
                         f"scaling.num_workers {s.num_workers}")


def build_encoder(section: ModelSection, seed: int = 0) -> Encoder:
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



def mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))



def sum_over_workers(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())



def check_prepared(manifest: dict, encoder: Encoder, objective: Any) -> None:
    """ValueError unless the prepared token ids are this model's and objective's: same tokenizer
    (vocabulary, prefixes, pad id), same max lengths, the objective's kind of rows."""
    mined = hasattr(objective, "num_negatives")
    want = {"tokenizer": tokenizer_identity(encoder.text_tokenizer), "kind": "mined" if mined else "pairs",
            "query_max_length": objective.query_max_length,
            "document_max_length": objective.document_max_length}
    diff = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
    if diff:
        raise ValueError(f"prepared data does not match the model/objective (manifest, wanted): {diff}; "
                         f"prepare it again (data.prepared empty or another location)")



def truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop metric rows of steps that will be re-run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step]
    path.write_text("".join(r + "\n" for r in rows))






def publish_metrics(checkpoint: str, location: str) -> dict[str, str]:
    """Copy metrics.jsonl from the final checkpoint (written on rank 0's node) into the run's
    storage location and plot it there as curves.png: nothing stays on one node's disk."""
    text = read_text(join(checkpoint, METRICS_FILE))
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    write_text(join(location, METRICS_FILE), text)
    out = {"metrics_path": join(location, METRICS_FILE)}
    if rows and importlib.util.find_spec("matplotlib") is None:  # a bare GPU host (bench/gpu)
        print("matplotlib is not installed: no curves.png", file=sys.stderr)
    elif rows:
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
