"""Embedding stage for Ray Data: an actor pool of callable classes, each holding one raylib Encoder.

Actors load the model once and encode batches with `Encoder.encode_dense` (length-sorted
sub-batches, no grad, bf16 autocast on GPU). They take fractional CPUs by default so they never
starve the read/write tasks on small machines (RAY_NOTES.md); `num_gpus > 0` gives GPU actors.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

import numpy as np
import ray
from ray.data import Dataset


class EmbedActor:
    """Callable class for `map_batches`: adds `output_column` (float32 [n, d]) from `column`."""

    def __init__(self, model: str, column: str, kind: str, output_column: str, batch_size: int = 64,
                 max_length: int | None = None, num_threads: int | None = None,
                 dim: int | None = None, stats: Any = None,
                 also: Sequence[tuple] = ()):
        import torch

        from raylib.model import Encoder

        if kind not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoder = Encoder.from_pretrained(model)
        self.column, self.kind, self.output_column = column, kind, output_column
        # more (column, kind, output_column[, max_length]) encoded by the same model per call
        self.jobs = [(column, kind, output_column, max_length)]
        self.jobs += [(*j[:3], j[3] if len(j) > 3 else max_length) for j in also]
        for _, k, _, _ in self.jobs:
            if k not in ("query", "document"):
                raise ValueError(f"kind must be 'query' or 'document', got {k!r}")
        self.batch_size, self.max_length, self.dim = batch_size, max_length, dim
        self.seconds = 0.0  # time spent encoding (for throughput figures)
        self.rows = 0
        self.stats = stats  # optional actor with record_embed(key, rows, seconds)
        self.key = f"{output_column}:{uuid.uuid4().hex[:8]}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = 0
        for column, kind, output_column, max_length in self.jobs:
            limit = self.encoder.settings.max_length  # never past the model's positions
            if limit and (max_length is None or max_length > limit):
                max_length = limit
            texts = [str(t) for t in batch[column]]
            n = len(texts)
            if texts:
                emb = self.encoder.encode_dense(texts, kind, batch_size=self.batch_size,
                                                max_length=max_length, dim=self.dim)
            else:
                emb = np.zeros((0, self.dim or self.encoder.dim), dtype=np.float32)
            batch[output_column] = np.ascontiguousarray(emb, dtype=np.float32)
        self.seconds += time.perf_counter() - start
        self.rows += n
        if self.stats is not None:  # cumulative per actor: a resent record overwrites
            self.stats.record_embed.remote(self.key, self.rows, self.seconds)
        return batch


def embed(ds: Dataset, model: str, column: str, kind: str, output_column: str, concurrency: int = 1,
          num_gpus: float = 0, batch_size: int = 64, num_cpus: float = 0.5,
          max_length: int | None = None, rows_per_call: int | None = None,
          num_threads: int | None = None, dim: int | None = None, stats: Any = None,
          also: Sequence[tuple] = ()) -> Dataset:
    """Add `output_column` with dense embeddings of `column` using an actor pool of `concurrency`
    EmbedActors (GPU actors when `num_gpus > 0`). Each actor call gets `rows_per_call` rows
    (default 8 x batch_size) and encodes them in length-sorted batches of `batch_size`.
    `also`: more (column, kind, output_column[, max_length]) for the same actors (one model)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=dict(model=str(model), column=column, kind=kind,
                                   output_column=output_column, batch_size=batch_size,
                                   max_length=max_length, num_threads=num_threads, dim=dim,
                                   stats=stats, also=list(also)),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=int(rows_per_call or 8 * batch_size),
        batch_format="numpy",
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
    )
