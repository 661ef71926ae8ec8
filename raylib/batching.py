"""M3's length-grouped batching (M3 §3.4, App. B.1 Table 9): examples are grouped by token length
into buckets, each bucket has its own (global) batch size, bigger for shorter texts, and every
mini-batch comes from one bucket. Training uses `bucket_sources`: raylib.prepare tags each row's
source with its bucket, and the batch plan of raylib.train_data gives each tagged source its own
batch size. `length_grouped_schedule` is the in-memory reference schedule the tests check
(tests/test_m3_loss.py); no job calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class LengthBucket:
    """Examples of at most `max_length` tokens (and longer than the previous bucket's) are batched
    `batch_size` at a time (the global batch: all ranks together)."""

    max_length: int
    batch_size: int


@dataclass
class Step:
    """One global mini-batch: its bucket and the example indices of each rank (equal counts)."""

    bucket: int
    ranks: list[list[int]]

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.ranks)


@dataclass
class Schedule:
    steps: list[Step]
    bucket_counts: list[int]                      # examples per bucket
    dropped: list[int] = field(default_factory=list)  # example indices left out (see below)


def check_buckets(buckets: Sequence[LengthBucket], world_size: int = 1) -> list[LengthBucket]:
    """Buckets sorted by max_length; ValueError for non-increasing bounds or batch sizes that do
    not split evenly over the ranks."""
    if not buckets:
        raise ValueError("at least one length bucket is needed")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    out = sorted(buckets, key=lambda b: b.max_length)
    for i, b in enumerate(out):
        if b.max_length < 1 or b.batch_size < 1:
            raise ValueError(f"bucket {b}: max_length and batch_size must be >= 1")
        if i and b.max_length == out[i - 1].max_length:
            raise ValueError(f"two buckets with max_length {b.max_length}")
        if b.batch_size % world_size:
            raise ValueError(f"bucket batch_size {b.batch_size} does not split over {world_size} ranks")
    return out


def assign_buckets(lengths: Sequence[int], buckets: Sequence[LengthBucket]) -> np.ndarray:
    """Bucket index per example: the first bucket whose max_length >= length; longer examples
    (they get truncated to the model's max length anyway) go to the last bucket."""
    bounds = np.array([b.max_length for b in check_buckets(buckets)])
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be a 1-D sequence of token counts")
    return np.minimum(np.searchsorted(bounds, lengths, side="left"), len(bounds) - 1)


def length_grouped_schedule(lengths: Sequence[int], buckets: Sequence[LengthBucket],
                            world_size: int = 1, seed: int = 0, epoch: int = 0,
                            drop_last: bool = False) -> Schedule:
    """All steps of one epoch: each bucket shuffled and cut into batches of its batch_size, the
    batches of all buckets shuffled together; identical on every rank for the same arguments.

    A bucket's last, short batch is kept, trimmed to a multiple of world_size (every rank gets
    the same count); with drop_last it is dropped. Left-out examples are listed in `dropped`.
    """
    buckets = check_buckets(buckets, world_size)
    which = assign_buckets(lengths, buckets)
    rng = np.random.default_rng([seed, epoch])
    steps: list[Step] = []
    dropped: list[int] = []
    counts = []
    for k, bucket in enumerate(buckets):
        members = np.flatnonzero(which == k)
        counts.append(len(members))
        members = rng.permutation(members)
        for start in range(0, len(members), bucket.batch_size):
            chunk = members[start:start + bucket.batch_size]
            if len(chunk) < bucket.batch_size:
                keep = 0 if drop_last else len(chunk) - len(chunk) % world_size
                dropped.extend(int(i) for i in chunk[keep:])
                chunk = chunk[:keep]
            if len(chunk) == 0:
                continue
            per_rank = len(chunk) // world_size
            steps.append(Step(bucket=k, ranks=[[int(i) for i in chunk[r * per_rank:(r + 1) * per_rank]]
                                               for r in range(world_size)]))
    order = rng.permutation(len(steps))
    return Schedule(steps=[steps[i] for i in order], bucket_counts=counts, dropped=sorted(dropped))


def bucket_sources(sources: Sequence[str], lengths: Sequence[int], bounds: Sequence[int]) -> list[str]:
    """Tag each row's batch source with its length bucket (`<source>#len<=<bound>`), so a data plan
    that draws every global batch from one source draws it from one bucket, on every rank."""
    buckets = [LengthBucket(int(b), 1) for b in bounds]
    which = assign_buckets(lengths, buckets)
    ordered = check_buckets(buckets)
    return [f"{s}#len<={ordered[k].max_length}" for s, k in zip(sources, which)]
