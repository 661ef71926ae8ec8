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
     streaming; each batch of `scratch_batch_rows` rows is written to scratch storage as one
     Parquet part per shard it touches (`write_shard_parts`), embeddings included. The driver
     only collects the parts' manifest (paths and row counts).
  4. One Ray Data task per shard (`filter_shards`) reads that shard's parts, de-duplicates and
     ranks with exact FAISS search, and streams its kept pairs to the output.
Memory per worker is therefore bounded by max(one batch, one shard) and never by the data set;
the cost is writing every embedding to scratch storage once and reading it once. (Ray Data's
groupby/map_groups would be the obvious alternative, but its hash-shuffle aggregators hold their
partitions in memory until the whole input is shuffled: per-worker memory grows with the data.)
Per-shard counts go to a named `CurationStats` actor keyed by shard, so a retried shard task
overwrites rather than double-counts: the job's totals stay exact.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from raylib.filters import (HeuristicConfig, consistency_ranks, document_keys, duplicate_mask,
                            heuristic_reasons, pair_hash)
from raylib.reader import ROWS_PER_BATCH, as_text, row_reasons
from raylib.storage import filesystem_for

GROUP = ("source", "language")
STATUS = "_status"  # heuristic name or None (kept so far)


@ray.remote(num_cpus=0)
class CurationStats:
    """Per-shard counts and timings, keyed by shard so retries overwrite instead of adding."""

    def __init__(self) -> None:
        self.shards: dict[str, dict] = {}
        self.embed: dict[str, tuple[int, float]] = {}
        self.embed_split: dict[str, dict[str, float]] = {}  # per actor: tokenize_s, model_s
        self.tokenize: dict[str, tuple[int, float]] = {}  # per upstream tokenizer worker

    def record_shard(self, key: str, counts: dict) -> None:
        self.shards[key] = counts

    def record_embed(self, key: str, rows: int, seconds: float,
                     split: dict[str, float] | None = None) -> None:
        self.embed[key] = (rows, seconds)
        if split is not None:
            self.embed_split[key] = split

    def record_tokenize(self, key: str, rows: int, seconds: float) -> None:
        self.tokenize[key] = (rows, seconds)

    def get(self) -> dict:
        return {"shards": dict(self.shards), "embed": dict(self.embed),
                "embed_split": dict(self.embed_split), "tokenize": dict(self.tokenize)}


def annotate_heuristics(ds: Dataset, cfg: HeuristicConfig, num_cpus: float | None = None) -> Dataset:
    """Add `_status`: the first failing row-level heuristic (or null) for each pair."""

    def fn(table: pa.Table) -> pa.Table:
        reasons = heuristic_reasons(table.column("query").to_pylist(),
                                    table.column("document").to_pylist(), cfg)
        return table.append_column(STATUS, pa.array(reasons, type=pa.string()))

    return ds.map_batches(fn, batch_format="pyarrow", num_cpus=num_cpus, batch_size=ROWS_PER_BATCH)


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
    counted = ds.map_batches(fn, batch_format="pyarrow", batch_size=ROWS_PER_BATCH)
    for batch in counted.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            key = (r[STATUS], r["source"], r["language"])
            totals[key] = totals.get(key, 0) + int(r["count_all"])
    return totals


def _texts(table: pa.Table, column: str) -> list[str]:
    return as_text(table.column(column))[0] if table.num_rows else []


def assign_shards(ds: Dataset, shards_per_group: dict[tuple[str, str], int]) -> Dataset:
    """Add `shard` (int64, within its (source, language) group) to each row by pair hash."""

    def fn(table: pa.Table) -> pa.Table:
        groups = zip(table.column("source").to_pylist(), table.column("language").to_pylist())
        pairs = zip(table.column("query").to_pylist(), table.column("document").to_pylist())
        shard = [pair_hash(q, d) % shards_per_group[g] for g, (q, d) in zip(groups, pairs)]
        return table.append_column("shard", pa.array(shard, type=pa.int64()))

    return ds.map_batches(fn, batch_format="pyarrow", batch_size=ROWS_PER_BATCH)


# ----------------------------------------------------------------------------- shard parts
def _fixed_list(emb: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [n, d] -> Arrow fixed_size_list<float32, d> (plain Parquet, no Ray extension)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float32, d> column -> float32 [n, d]."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)


def group_dir(source: str, language: str) -> str:
    """Scratch sub-directory of one (source, language) group (a hash: names may hold any text)."""
    return "g" + hashlib.blake2b(f"{source}\x1f{language}".encode(), digest_size=6).hexdigest()


def write_shard_parts(table: pa.Table, fs: pafs.FileSystem, root: str,
                      emb_columns: Sequence[str]) -> pa.Table:
    """Write a batch as one Parquet part per (source, language, shard) under `root` of `fs`
    (built on the driver, so workers need no S3 settings); return the parts' manifest (source,
    language, shard, path, rows). Holds one batch, bounded by the stage's batch size."""
    for c in emb_columns:  # Ray's tensor extension -> plain fixed-size lists
        i = table.column_names.index(c)
        table = table.set_column(i, c, _fixed_list(table.column(c).combine_chunks()
                                                   .to_numpy(zero_copy_only=False)))
    keys = list(zip(table.column("source").to_pylist(), table.column("language").to_pylist(),
                    table.column("shard").to_pylist()))
    parts: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        parts.setdefault(k, []).append(i)
    rows = []
    for (src, lang, shard), idx in sorted(parts.items()):
        path = f"{root}/{group_dir(src, lang)}/shard={shard:06d}/{uuid.uuid4().hex}.parquet"
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table.take(pa.array(idx, type=pa.int64())), path, filesystem=fs)
        rows.append({"source": src, "language": lang, "shard": shard, "path": path, "rows": len(idx)})
    schema = pa.schema([("source", pa.string()), ("language", pa.string()), ("shard", pa.int64()),
                        ("path", pa.string()), ("rows", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def shard_manifest(parts: Dataset) -> list[dict]:
    """Run the part-writing dataset; one record per shard: source, language, shard, paths, rows."""
    shards: dict[tuple, dict] = {}
    for batch in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            key = (r["source"], r["language"], r["shard"])
            rec = shards.setdefault(key, {"source": key[0], "language": key[1], "shard": key[2],
                                          "paths": [], "rows": 0})
            rec["paths"].append(r["path"])
            rec["rows"] += r["rows"]
    return [shards[k] for k in sorted(shards)]


# ----------------------------------------------------------------------------- ranking
class ShardFilter:
    """One shard's parts in, its kept pairs out (with `consistency_rank`): de-duplicate, then keep
    pairs whose own document ranks within `top_k` among the shard's documents."""

    def __init__(self, fs: pafs.FileSystem, top_k: int | None, dedupe: bool, stats: Any,
                 q_col: str = "_q_emb", d_col: str = "_d_emb", use_gpu: bool | None = None):
        self.fs, self.top_k, self.dedupe, self.stats = fs, top_k, dedupe, stats
        self.q_col, self.d_col, self.use_gpu = q_col, d_col, use_gpu

    def __call__(self, batch: pa.Table) -> pa.Table:
        assert batch.num_rows == 1, batch.num_rows  # one shard per call
        rec = batch.to_pylist()[0]
        table = pa.concat_tables([pq.read_table(p, filesystem=self.fs) for p in rec["paths"]])
        start = time.perf_counter()
        n = table.num_rows
        queries, documents = table.column("query").to_pylist(), table.column("document").to_pylist()
        dup = duplicate_mask(queries, documents) if self.dedupe else np.zeros(n, dtype=bool)
        keep = ~dup
        ranks = np.zeros(n, dtype=np.int64)
        if self.top_k is not None and keep.any():
            idx = np.flatnonzero(keep)
            # embeddings leave the table first: one copy of them at a time (Arrow's, or ours)
            q_emb, d_emb = _matrix(table.column(self.q_col)), _matrix(table.column(self.d_col))
            table = table.drop_columns([self.q_col, self.d_col])
            if len(idx) < n:
                q_emb, d_emb = q_emb[idx], d_emb[idx]
            ranks[idx] = consistency_ranks(q_emb, d_emb, document_keys([documents[i] for i in idx]),
                                           self.top_k, use_gpu=self.use_gpu)
            del q_emb, d_emb
            consistent = np.zeros(n, dtype=bool)
            consistent[idx] = ranks[idx] <= self.top_k
        else:
            consistent = keep.copy()
        kept = keep & consistent
        key = f"{rec['source']}\x1f{rec['language']}\x1f{rec['shard']}"
        counts = {"pairs": n, "duplicate": int(dup.sum()), "consistency": int((keep & ~consistent).sum()),
                  "kept": int(kept.sum()), "seconds": time.perf_counter() - start}
        ray.get(self.stats.record_shard.remote(key, counts))
        out = table.drop_columns([c for c in (self.q_col, self.d_col) if c in table.column_names])
        out = out.filter(pa.array(kept))
        if self.top_k is not None:
            out = out.append_column("consistency_rank", pa.array(ranks[kept]))
        return out


def _filter_shard(batch: pa.Table, **kwargs: Any) -> pa.Table:
    return ShardFilter(**kwargs)(batch)


def filter_shards(manifest: list[dict], fs: pafs.FileSystem, top_k: int | None, dedupe: bool, stats: Any,
                  num_cpus: float | None = None, num_gpus: float | None = None,
                  use_gpu: bool | None = None) -> Dataset:
    """One Ray Data task per shard (streaming, `num_cpus`/`num_gpus` each): read its parts,
    de-duplicate and rank (top_k None: de-duplicate only). Memory per task: one shard."""
    items = [{"source": m["source"], "language": m["language"], "shard": m["shard"],
              "paths": m["paths"]} for m in manifest]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_filter_shard, batch_size=1, batch_format="pyarrow",
                          fn_kwargs=dict(fs=fs, top_k=top_k, dedupe=dedupe, stats=stats,
                                         use_gpu=use_gpu),
                          num_cpus=num_cpus, num_gpus=num_gpus or None,
                          # a fresh process per shard: what one shard's ranking leaves behind
                          # (allocator pages, FAISS buffers) never adds up over the next shards
                          max_calls=1)


def delete_scratch(scratch: str) -> None:
    """Remove the shard parts once the kept pairs are written."""
    fs, root = filesystem_for(scratch)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)


def summarize_shards(stats: dict) -> dict[str, Any]:
    """Totals over the per-shard records of CurationStats."""
    shards = stats["shards"].values()
    total = {k: sum(s[k] for s in shards) for k in ("pairs", "duplicate", "consistency", "kept")}
    total["seconds"] = sum(s["seconds"] for s in shards)
    total["num_shards"] = len(stats["shards"])
    sizes = [s["pairs"] for s in shards]
    total["shard_pairs_min"] = min(sizes) if sizes else 0
    total["shard_pairs_max"] = max(sizes) if sizes else 0
    embeds = stats["embed"].values()  # (rows, actor seconds) per embedding actor
    total["embed_rows"] = sum(r for r, _ in embeds)
    total["embed_seconds"] = sum(s for _, s in embeds)
    return total


