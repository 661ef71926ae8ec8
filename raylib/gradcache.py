"""Gradient caching (Gao et al., 2021): a contrastive batch larger than activation memory allows.

1. embed every chunk of rows without grad (recording the RNG state of each chunk);
2. compute the loss on the concatenated embeddings (leaves), backward -> d loss / d embeddings;
3. re-run each chunk with grad under the same RNG state and backpropagate the cached gradient.
Loss and parameter gradients equal those of one unchunked batch (tests/test_gradcache.py), whatever
the loss does with the embeddings (Matryoshka prefixes, cross-worker gathers, several heads).
Generic over dict-of-tensor reps: {side: {name: tensor [rows, ...]}}. Plain PyTorch, no Ray.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

Features = dict[str, dict[str, torch.Tensor]]
Reps = dict[str, dict[str, torch.Tensor]]
EmbedFn = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
LossFn = Callable[[Reps], tuple[torch.Tensor, dict[str, float]]]


class RandContext:
    """Capture the CPU (and current CUDA device) RNG state now; `with ctx:` replays it (dropout)."""

    def __init__(self, device: torch.device | None = None):
        self.cpu_state = torch.get_rng_state()
        self.cuda = device is not None and device.type == "cuda"
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[self.device] if self.cuda else [], enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def pad_features(features: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id) and attention_mask (0) of one side to `length` tokens."""
    current = features["input_ids"].shape[1]
    if current > length:
        raise ValueError(f"cannot pad {current} tokens down to {length}")
    if current == length:
        return features
    out = dict(features)
    extra = length - current
    out["input_ids"] = torch.nn.functional.pad(features["input_ids"], (0, extra), value=pad_id)
    out["attention_mask"] = torch.nn.functional.pad(features["attention_mask"], (0, extra), value=0)
    return out


def chunk_rows(features: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of one side along rows into chunks of at most chunk_size."""
    n = next(iter(features.values())).shape[0]
    return [{k: v[i:i + chunk_size] for k, v in features.items()} for i in range(0, n, chunk_size)]


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = parts[0].keys()
    for p in parts:
        if p.keys() != keys:
            raise ValueError(f"embed returned different keys for different chunks: {sorted(keys)} vs {sorted(p)}")
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in keys}


def forward_backward(embed: EmbedFn, features: Features, loss_fn: LossFn, chunk_size: int | None = None,
                     no_sync: Callable[[], ContextManager] | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Embed every side, compute the loss, backpropagate into the parameters; returns (loss, metrics).

    chunk_size None or 0: one plain forward/backward. Otherwise gradient caching with row chunks of
    chunk_size per side. no_sync: the DDP model's no_sync (gradient all-reduce only on the last
    re-forward). Every side must be padded to one length per side (chunks then concatenate).
    """
    if not chunk_size:
        reps = {side: embed(side, feats) for side, feats in features.items()}
        loss, metrics = loss_fn(reps)
        loss.backward()
        return loss.detach(), metrics
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
    chunks = {side: chunk_rows(feats, chunk_size) for side, feats in features.items()}
    states: dict[str, list[RandContext]] = {side: [] for side in chunks}
    cached: Reps = {}
    with torch.no_grad():
        for side, parts in chunks.items():
            outs = []
            for part in parts:
                states[side].append(RandContext(device))
                outs.append(embed(side, part))
            cached[side] = _concat(outs)
    leaves: Reps = {side: {k: (v.detach().float().requires_grad_() if v.is_floating_point() else v)
                           for k, v in reps.items()} for side, reps in cached.items()}
    loss, metrics = loss_fn(leaves)
    loss.backward()
    grads = {side: {k: v.grad for k, v in reps.items() if v.is_floating_point() and v.grad is not None}
             for side, reps in leaves.items()}
    jobs = [(side, i, part) for side, parts in chunks.items() for i, part in enumerate(parts)]
    for n, (side, i, part) in enumerate(jobs):
        last = n == len(jobs) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync, states[side][i]:
            out = embed(side, part)
            start = i * chunk_size
            surrogate = None
            for k, g in grads[side].items():
                term = (out[k].float() * g[start:start + out[k].shape[0]]).sum()
                surrogate = term if surrogate is None else surrogate + term
            if surrogate is None:  # this side does not touch the loss: still run backward for DDP
                surrogate = sum(v.float().sum() * 0.0 for v in out.values() if v.is_floating_point())
            surrogate.backward()
    return loss.detach(), metrics
