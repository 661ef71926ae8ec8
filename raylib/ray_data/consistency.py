"""Ray Data glue for curation: heuristic filters, shard assignment and top-k consistency filtering.

Sharding and memory (design choice). Arctic-Embed 2.0 ranks each pair's document among all
documents of its ~3M-pair shard, where shards are even cuts of one (source, language) dataset.
  1. A counting pass (`status_counts`: per-block counts summed on the driver, O(groups)
     memory) gives the input size, rejects by reason, drops by row-level heuristic and each
     group's size after them, hence its number of shards `ceil(n / shard_size)`.
  2. Each row gets `shard = pair_hash(query, document) mod num_shards` (stateless and streaming;
     shard sizes are even up to binomial noise, +-sqrt(shard_size); exact duplicate pairs land
     in the same shard, so per-shard de-duplication is de-duplication within the dataset).
  3. Queries and documents are embedded by actor pools (raylib/ray_data/embed.py) while
     streaming, and `groupby([source, language, shard]).map_groups(...)` brings each shard
     together. The hash shuffle is given one partition per shard, so a map_groups call holds
     about one shard (a few where shard keys collide in the hash): memory per worker is set by
     shard_size and does not grow with the data set; the shuffle itself is Ray's object store,
     which spills to disk. A streaming alternative (write embeddings partitioned by shard, then
     one task per shard) bounds memory exactly but writes every embedding to storage twice.
Per-shard counts go to a named `CurationStats` actor keyed by shard, so a retried shard task
overwrites rather than double-counts: the job's totals stay exact.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data import Dataset

from raylib.filters import (HeuristicConfig, consistency_ranks, document_keys, duplicate_mask,
                            heuristic_reasons, pair_hash)
from raylib.ray_data.io import _as_text, row_reasons

GROUP = ("source", "language")
STATUS = "_status"  # heuristic name or None (kept so far)


@ray.remote(num_cpus=0)
class CurationStats:
    """Per-shard counts and timings, keyed by shard so retries overwrite instead of adding."""

    def __init__(self) -> None:
        self.shards: dict[str, dict] = {}
        self.embed: dict[str, tuple[int, float]] = {}

    def record_shard(self, key: str, counts: dict) -> None:
        self.shards[key] = counts

    def record_embed(self, key: str, rows: int, seconds: float) -> None:
        self.embed[key] = (rows, seconds)

    def get(self) -> dict:
        return {"shards": dict(self.shards), "embed": dict(self.embed)}


def annotate_heuristics(ds: Dataset, cfg: HeuristicConfig, num_cpus: float | None = None) -> Dataset:
    """Add `_status`: the first failing row-level heuristic (or null) for each pair."""

    def fn(table: pa.Table) -> pa.Table:
        reasons = heuristic_reasons(table.column("query").to_pylist(),
                                    table.column("document").to_pylist(), cfg)
        return table.append_column(STATUS, pa.array(reasons, type=pa.string()))

    return ds.map_batches(fn, batch_format="pyarrow", num_cpus=num_cpus)


def status_counts(ds: Dataset, required: Sequence[str], max_chars: int | None,
                  cfg: HeuristicConfig) -> dict[tuple[str, str, str], int]:
    """One counting pass over the raw input: {(status, source, language): rows}, where status is
    "reject:<reason>", a heuristic name, or "" (kept so far; source/language are "" on rejects).

    Each block is reduced to its few counts, summed on the driver: no shuffle, memory
    O(blocks x groups)."""
    required = list(required)

    def fn(table: pa.Table) -> pa.Table:
        reasons = row_reasons(table, required, max_chars)
        good = table.filter(pa.array([r is None for r in reasons]))
        heur = iter(heuristic_reasons(_texts(good, "query"), _texts(good, "document"), cfg))
        sources = iter(_texts(good, "source"))
        languages = iter(_texts(good, "language"))
        status, src, lang = [], [], []
        for r in reasons:
            if r is None:
                status.append(next(heur) or "")
                src.append(next(sources))
                lang.append(next(languages))
            else:
                status.append("reject:" + r)
                src.append("")
                lang.append("")
        t = pa.table({STATUS: status, "source": src, "language": lang})
        return t.group_by([STATUS, *GROUP]).aggregate([([], "count_all")])

    totals: dict[tuple[str, str, str], int] = {}
    for batch in ds.map_batches(fn, batch_format="pyarrow").iter_batches(batch_format="pyarrow",
                                                                         batch_size=None):
        for r in batch.to_pylist():
            key = (r[STATUS], r["source"], r["language"])
            totals[key] = totals.get(key, 0) + int(r["count_all"])
    return totals


def _texts(table: pa.Table, column: str) -> list[str]:
    return _as_text(table.column(column))[0] if table.num_rows else []


def assign_shards(ds: Dataset, shards_per_group: dict[tuple[str, str], int]) -> Dataset:
    """Add `shard` (int64, within its (source, language) group) to each row by pair hash."""

    def fn(table: pa.Table) -> pa.Table:
        groups = zip(table.column("source").to_pylist(), table.column("language").to_pylist())
        pairs = zip(table.column("query").to_pylist(), table.column("document").to_pylist())
        shard = [pair_hash(q, d) % shards_per_group[g] for g, (q, d) in zip(groups, pairs)]
        return table.append_column("shard", pa.array(shard, type=pa.int64()))

    return ds.map_batches(fn, batch_format="pyarrow")


class ShardFilter:
    """map_groups UDF: one shard in, its kept pairs out (with `consistency_rank`)."""

    def __init__(self, top_k: int | None, dedupe: bool, stats: Any, q_col: str = "_q_emb",
                 d_col: str = "_d_emb", use_gpu: bool | None = None):
        self.top_k, self.dedupe, self.stats = top_k, dedupe, stats
        self.q_col, self.d_col, self.use_gpu = q_col, d_col, use_gpu

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["query"])
        key = f"{batch['source'][0]}\x1f{batch['language'][0]}\x1f{int(batch['shard'][0])}" if n else ""
        start = time.perf_counter()
        queries, documents = list(batch["query"]), list(batch["document"])
        dup = duplicate_mask(queries, documents) if self.dedupe else np.zeros(n, dtype=bool)
        keep = ~dup
        ranks = np.zeros(n, dtype=np.int64)
        if self.top_k is not None and keep.any():
            idx = np.flatnonzero(keep)
            ranks[idx] = consistency_ranks(batch[self.q_col][idx], batch[self.d_col][idx],
                                           document_keys([documents[i] for i in idx]),
                                           self.top_k, use_gpu=self.use_gpu)
            consistent = np.zeros(n, dtype=bool)
            consistent[idx] = ranks[idx] <= self.top_k
        else:
            consistent = keep.copy()
        kept = keep & consistent
        counts = {"pairs": n, "duplicate": int(dup.sum()), "consistency": int((keep & ~consistent).sum()),
                  "kept": int(kept.sum()), "seconds": time.perf_counter() - start}
        if n:
            ray.get(self.stats.record_shard.remote(key, counts))
        out = {k: v[kept] for k, v in batch.items() if k not in (self.q_col, self.d_col, STATUS)}
        if self.top_k is not None:
            out["consistency_rank"] = ranks[kept]
        return out


def _filter_shard(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    return ShardFilter(**kwargs)(batch)


def filter_shards(ds: Dataset, num_partitions: int, top_k: int | None, dedupe: bool, stats: Any,
                  num_cpus: float | None = None, num_gpus: float | None = None,
                  use_gpu: bool | None = None) -> Dataset:
    """Group by (source, language, shard) with one hash partition per shard, then de-duplicate
    and keep pairs whose own document ranks within `top_k` (None: de-duplicate only)."""
    return ds.groupby([*GROUP, "shard"], num_partitions=max(1, num_partitions)).map_groups(
        _filter_shard, fn_kwargs=dict(top_k=top_k, dedupe=dedupe, stats=stats, use_gpu=use_gpu),
        batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus or None)


def summarize_shards(stats: dict) -> dict[str, Any]:
    """Totals over the per-shard records of CurationStats."""
    shards = stats["shards"].values()
    total = {k: sum(s[k] for s in shards) for k in ("pairs", "duplicate", "consistency", "kept")}
    total["seconds"] = sum(s["seconds"] for s in shards)
    total["num_shards"] = len(stats["shards"])
    sizes = [s["pairs"] for s in shards]
    total["shard_pairs_min"] = min(sizes) if sizes else 0
    total["shard_pairs_max"] = max(sizes) if sizes else 0
    return total


def heuristics_dict(cfg: HeuristicConfig) -> dict:
    return asdict(cfg)
