"""InfoNCE (van den Oord et al., 2018) over scaled dot products; Arctic-Embed 2.0 App. C uses tau=0.02."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
             temperature: float = 0.02) -> torch.Tensor:
    """Mean cross-entropy of each query's positive against all candidates.

    queries:    [B, D] (normalize first for cosine similarity)
    candidates: [N, D] positives and negatives (e.g. in-batch documents gathered from all workers)
    positives:  [B] long, index of each query's positive row in `candidates`
    returns:    scalar
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = queries @ candidates.T / temperature  # [B, N]
    return F.cross_entropy(scores, positives)
