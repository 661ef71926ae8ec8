"""Training batches from Parquet (or JSONL) pairs read with Ray Data, fed to the Train workers.

Arctic-Embed 2.0 App. C: every global batch comes from one source; for multilingual sources each
(source x language) subset is its own source. The plan is a pure function of (rows, seed):

- per source, rows are put in content-hash order (independent of files and block layout), then
  permuted with rng(seed, epoch, source) and cut into full global batches (the remainder of each
  source is dropped and counted);
- per epoch, all batches of all sources are shuffled with rng(seed, epoch): the next batch's source
  is thereby drawn in proportion to the source's (remaining) size, and every kept row is used once;
- global step = epoch * steps_per_epoch + position; rows rank*b .. (rank+1)*b-1 go to worker `rank`.

The data position of a checkpoint is just the next step: a restarted run computes the same plan and
resumes at the exact next batch. The driver reads the pairs with Ray Data and puts one Arrow table per
source in the object store; each worker takes its rows of each step from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import pyarrow as pa


def source_key(source, language) -> str:
    """The batch source name: `source` or `source/language`."""
    return f"{source}/{language}" if language not in (None, "") else str(source)


def _row_hashes(table: pa.Table) -> np.ndarray:
    """A content hash per row (of the `id` column when there is one) for a layout-independent order."""
    if "id" in table.column_names:
        texts = [str(v) for v in table.column("id").to_pylist()]
    else:
        data = {c: table.column(c).to_pylist() for c in table.column_names}
        texts = ["\x1f".join(repr(data[c][i]) for c in table.column_names) for i in range(table.num_rows)]
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big") >> 1
                     for t in texts], dtype=np.int64)


def split_sources(table: pa.Table) -> dict[str, pa.Table]:
    """{source key: its rows in content-hash order}; needs a `source` column (`language` optional)."""
    if "source" not in table.column_names:
        raise ValueError(f"training data needs a 'source' column (batches are drawn per source); "
                         f"got {table.column_names}")
    sources = table.column("source").to_pylist()
    languages = table.column("language").to_pylist() if "language" in table.column_names else [None] * len(sources)
    keys = np.array([source_key(s, lang) for s, lang in zip(sources, languages)], dtype=object)
    hashes = _row_hashes(table)
    out = {}
    for key in sorted(set(keys.tolist())):
        idx = np.flatnonzero(keys == key)
        idx = idx[np.argsort(hashes[idx], kind="stable")]
        out[key] = table.take(pa.array(idx))
    return out


@dataclass(frozen=True)
class BatchPlan:
    """Which rows of which source make step t's global batch; pure and cheap to recompute anywhere."""

    source_rows: tuple[tuple[str, int], ...]   # (source key, rows), sorted by key
    global_batch_size: int
    num_workers: int
    seed: int
    epochs: int
    max_steps: int = 0
    batch_sizes: tuple[tuple[str, int], ...] = ()  # (source key, its global batch size) overrides

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        for source, size in ((None, self.global_batch_size), *self.batch_sizes):
            if size < 1 or size % self.num_workers:
                raise ValueError(f"global batch size {size}{f' of {source}' if source else ''} must be a "
                                 f"positive multiple of num_workers {self.num_workers}")
        if self.steps_per_epoch == 0:
            raise ValueError(f"no source has a full global batch: rows {dict(self.source_rows)}, "
                             f"batch sizes {self.sizes}")

    @property
    def sizes(self) -> dict[str, int]:
        """{source: global batch size} for every source."""
        override = dict(self.batch_sizes)
        return {s: override.get(s, self.global_batch_size) for s, _ in self.source_rows}

    @property
    def source_batches(self) -> dict[str, int]:
        sizes = self.sizes
        return {s: n // sizes[s] for s, n in self.source_rows}

    @property
    def dropped_rows(self) -> int:
        sizes = self.sizes
        return sum(n % sizes[s] for s, n in self.source_rows)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.source_batches.values())

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def batch_order(self, epoch: int) -> list[tuple[str, int]]:
        """All (source, batch index) pairs of one epoch in a seeded random order."""
        return _batch_order(tuple(self.source_batches.items()), self.seed, epoch)

    def rows_of(self, step: int, rank: int | None = None) -> tuple[str, np.ndarray]:
        """(source, row indices into that source's table) of a step, all or one worker's part."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside 0..{self.total_steps - 1}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        source, batch = self.batch_order(epoch)[pos]
        keys = [s for s, _ in self.source_rows]
        size = self.sizes[source]
        perm = _permutation(dict(self.source_rows)[source], self.seed, epoch, keys.index(source))
        rows = perm[batch * size:(batch + 1) * size]
        if rank is not None:
            b = size // self.num_workers
            rows = rows[rank * b:(rank + 1) * b]
        return source, rows

    def summary(self) -> dict:
        return {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size, "num_workers": self.num_workers,
                "source_rows": dict(self.source_rows), "source_batches": self.source_batches,
                "batch_sizes": dict(self.batch_sizes), "dropped_rows": self.dropped_rows}


@lru_cache(maxsize=8)
def _batch_order(source_batches: tuple[tuple[str, int], ...], seed: int, epoch: int) -> list[tuple[str, int]]:
    items = [(s, b) for s, n in source_batches for b in range(n)]
    perm = np.random.default_rng([seed, epoch, 7]).permutation(len(items))
    return [items[i] for i in perm]


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int, source_index: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1000 + source_index]).permutation(n)


def resolve_batch_sizes(sources: list[str], patterns: dict[str, int]) -> dict[str, int]:
    """{source: size} for the sources that a pattern names: the source key itself or its ending
    (`#len<=512` names every length bucket of that bound); an exact key wins over an ending."""
    out = {}
    for source in sources:
        hits = [p for p in patterns if source == p] or [p for p in patterns if source.endswith(p)]
        if len(hits) > 1:
            raise ValueError(f"source {source!r} matches several batch size patterns: {hits}")
        if hits:
            out[source] = int(patterns[hits[0]])
    return out


def make_plan(tables: dict[str, pa.Table], global_batch: int, num_workers: int, seed: int, epochs: int,
              max_steps: int = 0, batch_sizes: dict[str, int] | None = None) -> BatchPlan:
    """The plan for {source: table} (as split_sources returns); `batch_sizes` maps source keys or
    key endings to their own global batch size (M3 §3.4: larger batches for shorter texts)."""
    sources = sorted(tables)
    sizes = resolve_batch_sizes(sources, batch_sizes or {})
    return BatchPlan(tuple((s, tables[s].num_rows) for s in sources), global_batch, num_workers,
                     seed, epochs, max_steps, tuple(sorted(sizes.items())))


def read_pairs(paths: list[str], fmt: str = "parquet") -> pa.Table:
    """All pair rows of Parquet or JSONL files/dirs (local or s3://), read with Ray Data."""
    import ray.data

    if not paths:
        raise ValueError("data.paths is empty")
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths)
    elif fmt == "json":
        ds = ray.data.read_json(paths)
    else:
        raise ValueError(f"data.format must be parquet or json, got {fmt!r}")
    # a plain read cannot deadlock; on a loaded host its first task may just take minutes to start
    if 0 < ds.context.execution_no_progress_timeout_s < 600:
        ds.context.execution_no_progress_timeout_s = 600
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    if not blocks:
        raise ValueError(f"no rows in {paths}")
    return pa.concat_tables(blocks, promote_options="default")


def iter_steps(plan: BatchPlan, tables: dict[str, pa.Table], start_step: int,
               rank: int) -> Iterator[tuple[int, dict[str, list]]]:
    """(step, rows {column: list}) of this worker from start_step to the end of the plan."""
    for step in range(start_step, plan.total_steps):
        source, idx = plan.rows_of(step, rank)
        part = tables[source].take(pa.array(idx))
        yield step, {c: part.column(c).to_pylist() for c in part.column_names}


def synthetic_pairs(n: int, sources: dict[str, float] | None = None, seed: int = 0) -> pa.Table:
    """A learnable toy pair set for tests, debug runs and benchmarks (words of raylib.tiny's vocab):
    the document repeats the query's 3 topic words among 6 random filler words. Columns: id, query,
    document, source, language; `sources` maps "source/language" to its share of rows."""
    from raylib.tiny import _WORDS

    rng = np.random.default_rng(seed)
    sources = sources or {"web/en": 1.0}
    names = list(sources)
    shares = np.array([sources[s] for s in names], dtype=float)
    which = rng.choice(len(names), size=n, p=shares / shares.sum())
    rows = {"id": [], "query": [], "document": [], "source": [], "language": []}
    for i in range(n):
        topic = rng.choice(len(_WORDS), size=3, replace=False)
        filler = rng.choice(len(_WORDS), size=6)
        words = [_WORDS[j] for j in np.concatenate([topic, filler])]
        rng.shuffle(words)
        source, _, language = names[which[i]].partition("/")
        rows["id"].append(f"p{i}")
        rows["query"].append(" ".join(_WORDS[j] for j in topic))
        rows["document"].append(" ".join(words))
        rows["source"].append(source)
        rows["language"].append(language)
    return pa.table(rows)
