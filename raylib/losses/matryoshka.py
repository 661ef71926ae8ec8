"""Matryoshka Representation Learning (Kusupati et al., 2022; Arctic-Embed 2.0 §2.5): the same loss on
the full vectors and on each truncated, re-normalized prefix, weighted and summed."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def matryoshka_loss(loss_fn: Callable[..., torch.Tensor], embeddings: Sequence[torch.Tensor],
                    dims: Sequence[int] = (), weights: Sequence[float] | None = None,
                    full_weight: float = 1.0) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """total = full_weight * loss_fn(*full) + sum_i weights[i] * loss_fn(*prefix_i).

    embeddings: tensors [..., D] that loss_fn takes positionally (e.g. queries [B, D], documents [N, D]);
      each is L2-normalized on the full D and on every prefix dims[i] < D.
    returns: (total scalar, {dim: unweighted loss}) with the full D as one key.
    """
    full = embeddings[0].shape[-1]
    if any(e.shape[-1] != full for e in embeddings):
        raise ValueError("all embeddings must share the last dimension")
    dims = list(dims)
    weights = [1.0] * len(dims) if weights is None or len(weights) == 0 else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"{len(dims)} matryoshka dims but {len(weights)} weights")
    for d in dims:
        if not 0 < d < full:
            raise ValueError(f"matryoshka dim {d} must be in 1..{full - 1} (the full {full} is always used)")
    losses: dict[int, torch.Tensor] = {full: loss_fn(*(F.normalize(e, dim=-1) for e in embeddings))}
    total = full_weight * losses[full]
    for d, w in zip(dims, weights):
        losses[d] = loss_fn(*(F.normalize(e[..., :d], dim=-1) for e in embeddings))
        total = total + w * losses[d]
    return total, losses
