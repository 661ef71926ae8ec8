"""InfoNCE over each query's own group (its positive + mined hard negatives), optionally widened
with in-batch and cross-worker negatives (Arctic-Embed 2.0 App. C; M3 §3.3 eq. 1).

Documents come as groups of G = 1 + n_neg texts, the positive first. With `in_batch` the
candidates of query i are every document of every group given (the local batch, or all workers'
after a gather), and its positive sits at column (offset + i) * G. Pure functions, no process group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_targets(num_queries: int, group_size: int, offset: int = 0, in_batch: bool = True,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Column of each query's positive: (offset + i) * G over all groups, or 0 within its own group."""
    if not in_batch:
        return torch.zeros(num_queries, dtype=torch.long, device=device)
    return (torch.arange(num_queries, device=device) + offset) * group_size


def infonce_from_scores(scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log softmax(scores / tau)[target], averaged: scores [B, C], targets [B] -> scalar."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.cross_entropy(scores.float() / temperature, targets)


def hard_negative_infonce(q: torch.Tensor, docs: torch.Tensor, group_size: int,
                          temperature: float = 0.02, in_batch: bool = False,
                          offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against its positive, its hard negatives and optionally every other
    document given (in-batch / cross-worker negatives).

    q [B, D] local queries; docs [N*G, D] documents of N >= B groups of size G (positive first),
    the local queries' groups at offset .. offset+B-1 (offset = rank * B after a gather).
    Returns (loss scalar, scores [B, C]) with C = N*G if in_batch else G.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if docs.shape[0] % group_size:
        raise ValueError(f"{docs.shape[0]} documents are not whole groups of {group_size}")
    n_groups = docs.shape[0] // group_size
    if offset < 0 or offset + q.shape[0] > n_groups:
        raise ValueError(f"queries {offset}..{offset + q.shape[0] - 1} have no group among {n_groups}")
    if in_batch:
        scores = q @ docs.T  # [B, N*G]
    else:
        own = docs.view(n_groups, group_size, -1)[offset:offset + q.shape[0]]  # [B, G, D]
        scores = torch.einsum("bd,bgd->bg", q, own)  # [B, G]
    targets = group_targets(q.shape[0], group_size, offset, in_batch, q.device)
    return infonce_from_scores(scores, targets, temperature), scores


def own_group_scores(scores: torch.Tensor, group_size: int, offset: int = 0) -> torch.Tensor:
    """[B, N*G] scores against all groups -> [B, G] scores against each query's own group."""
    num_q = scores.shape[0]
    cols = (torch.arange(num_q, device=scores.device)[:, None] + offset) * group_size \
        + torch.arange(group_size, device=scores.device)[None, :]  # [B, G]
    return scores.gather(1, cols)
