"""All-gather with gradient for cross-worker in-batch negatives (identity without a process group)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each of W ranks -> [W*b, ...] in rank order; gradients flow back to every rank.

    Every rank must pass the same shape. Without a process group (or with one rank) returns x.
    """
    rank, size = world()
    if size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; it is the one with autograd
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_offset(local_size: int) -> int:
    """Index of this rank's first row in an all_gather_with_grad output of equal-sized parts."""
    return world()[0] * local_size
