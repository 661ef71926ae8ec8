"""Curate query-document pairs with Ray Data: reject bad rows, heuristic filters, and top-k
consistency filtering (Arctic-Embed 2.0 section 2.3 / appendix B); the last stdout line is JSON.

  python jobs/filter.py --config jobs/configs/filter/debug.yaml [--set top_k=10 ...]
  ray job submit --working-dir . -- python jobs/filter.py --config jobs/configs/filter/h100.yaml

Input: Parquet/JSONL (file, list or dir; local or s3://) with query, document, source, language
(other columns are carried through). Output location `output` (local or s3://): `kept/` (pairs +
`shard` + `consistency_rank`, Parquet), `rejects/` (+ `reason`) and `summary.json`. Three streaming passes over the input:
(1) count every row by status and group (rejects, heuristics, group sizes -> shards per group),
(2) write the rejects, (3) heuristics, shard, embed (actor pool), write shard parts to scratch;
then one task per shard ranks it and writes its kept pairs. See raylib/ray_data/consistency.py
for the sharding and memory design.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from raylib.config import parse_job_args
from raylib.filters import HEURISTICS, HeuristicConfig, num_consistency_shards
from raylib.jobs.summary import finish, seconds
from raylib.model import ModelSpec
from raylib.storage import filesystem_for, join

REQUIRED = ("query", "document", "source", "language")


@dataclass
class FilterConfig:
    """Config of jobs/filter.py (unknown keys are an error)."""

    input: str | list[str] = ""  # Parquet/JSONL file(s) or dir, local or s3://
    output: str = ""  # the job's output location: kept/, rejects/, summary.json (local or s3://)
    rejects: str = ""  # rejected rows with `reason` (Parquet dir; default <output>/rejects)
    model: str | ModelSpec = "minilm"  # filter model: path or name (minilm, me5-small) or a ModelSpec mapping
    tokenize_upstream: bool | None = None  # token ids from CPU tasks before the actors (None: on GPU only)
    shard_size: int = 3_000_000  # pairs per consistency shard (even cuts of a source x language)
    top_k: int = 20  # keep a pair if its own document ranks within top_k of its shard
    consistency: bool = True  # false: heuristics and de-duplication only (no embedding)
    batch_size: int = 64  # encoder batch size inside an embedding actor
    rows_per_call: int = 512  # rows per actor call (sorted by length, then batched)
    concurrency: int = 1  # embedding actors per column (query, document)
    num_gpus_per_actor: float = 0.0  # > 0: GPU embedding actors (and GPU FAISS in shard tasks)
    num_cpus_per_actor: float = 0.5  # fractional so actors never starve read/write tasks
    num_threads_per_actor: int | None = None  # torch threads per actor (None: Ray's default)
    query_max_tokens: int = 32  # encoder truncation for queries
    document_max_tokens: int = 256  # encoder truncation for documents
    max_chars: int = 100_000  # rows with a longer query/document are rejected (too_long)
    heuristics: HeuristicConfig = field(default_factory=HeuristicConfig)
    read_blocks: int | None = None  # cap on read parallelism (None: Ray decides)
    scratch: str = ""  # shard parts with embeddings (default: <output>/_scratch)
    scratch_batch_rows: int = 50_000  # rows per part-writing batch (one part per shard it touches)
    keep_scratch: bool = False  # keep the shard parts after a successful run
    num_cpus_per_shard: float = 1.0  # CPUs per shard ranking task (FAISS threads)
    local_num_cpus: int = 8  # CPU tokens for a local Ray started by this job (not on a cluster)
    block_mib: int | None = 16  # Ray Data block cap (null: Ray's 128 MiB); bounds worker memory

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.shard_size < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("shard_size, batch_size and concurrency must be >= 1")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.scratch_batch_rows < 1:
            raise ValueError(f"scratch_batch_rows must be >= 1, got {self.scratch_batch_rows}")
        self.rejects = self.rejects or join(self.output, "rejects")
        self.scratch = self.scratch or join(self.output, "_scratch")

    @property
    def kept(self) -> str:
        """The kept pairs (Parquet dir): what the mining job reads."""
        return join(self.output, "kept")


def _log(msg: str) -> None:
    print(f"[filter] {msg}", file=sys.stderr, flush=True)


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


@dataclass
class StatusCounts:
    """Pass 1's census of the input: every row is rejected, dropped by a heuristic, or survives."""

    num_input: int
    rejected: dict[str, int]  # reason -> rows
    dropped: dict[str, int]  # heuristic -> rows
    survivors: dict[tuple[str, str], int]  # (source, language) -> rows

    @property
    def num_survivors(self) -> int:
        return sum(self.survivors.values())

    @classmethod
    def of(cls, counts: dict[tuple[str, str, str], int]) -> "StatusCounts":
        """From `consistency.status_counts`' {(status, source, language): rows}."""
        out = cls(sum(counts.values()), {}, {name: 0 for name in HEURISTICS}, {})
        for (status, src, language), n in counts.items():
            if status.startswith("reject:"):
                reason = status[len("reject:"):]
                out.rejected[reason] = out.rejected.get(reason, 0) + n
            elif status:
                out.dropped[status] += n
            else:
                out.survivors[(src, language)] = out.survivors.get((src, language), 0) + n
        return out


class Stages:
    """Wall time and rows of each pass, for the summary's throughput section."""

    def __init__(self) -> None:
        self.report: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    def done(self, name: str, rows: int) -> None:
        dt = time.perf_counter() - self.t0
        self.report[name] = {"rows": rows, "seconds": round(dt, 2), "rows_per_s": _rate(rows, dt)}
        _log(f"{name}: {rows} rows in {dt:.1f}s")
        self.t0 = time.perf_counter()


def run(cfg: FilterConfig) -> dict:
    """Run the curation job; writes <output>/summary.json, prints the report, returns the summary."""
    import ray
    from raylib.ray_env import init_data_ray
    from raylib.ray_data import consistency as cons
    from raylib.ray_data.io import read_table, split_rejects, write_parquet
    from raylib.reader import count_rows, value_counts

    init_data_ray(cfg.local_num_cpus, cfg.block_mib)
    t_start, stages = time.perf_counter(), Stages()

    def source() -> "ray.data.Dataset":
        return read_table(cfg.input, override_num_blocks=cfg.read_blocks)

    # pass 1: count every input row by status (reject reason / heuristic / kept) and group
    counts = StatusCounts.of(cons.status_counts(source(), REQUIRED, cfg.max_chars, cfg.heuristics))
    stages.done("count_and_heuristics", counts.num_input)
    # pass 2: write the rejects with their reason
    good, bad = split_rejects(source(), REQUIRED, cfg.max_chars)
    write_parquet(bad, cfg.rejects)
    written = value_counts(cfg.rejects, "reason")
    assert written == counts.rejected, (written, counts.rejected)  # written is what was counted
    stages.done("write_rejects", counts.num_input)
    # pass 3: heuristics again (pure, per row), shard, embed, rank within shards, write kept
    shards_per_group = {g: num_consistency_shards(n, cfg.shard_size)
                        for g, n in counts.survivors.items()}
    _log(f"{counts.num_survivors} pairs in {len(shards_per_group)} (source, language) groups -> "
         f"{sum(shards_per_group.values())} shards")
    stats = cons.CurationStats.remote()
    if counts.num_survivors:
        _curate(good, cfg, shards_per_group, stats, stages, counts.num_survivors)
    num_kept = count_rows(cfg.kept) if counts.num_survivors else 0
    totals = cons.summarize_shards(ray.get(stats.get.remote()))
    stages.done("rank_and_write", counts.num_survivors)
    summary = _summary(cfg, counts, totals, num_kept, sum(shards_per_group.values()), stages.report,
                       time.perf_counter() - t_start)
    return finish("filter", summary, cfg.output, _report_lines(cfg, summary))


def _curate(good: "ray.data.Dataset", cfg: FilterConfig, shards_per_group: dict[tuple[str, str], int],
            stats: "ray.actor.ActorHandle", stages: Stages, num_survivors: int) -> None:
    """Pass 3: drop flagged rows, shard, embed both columns, write shard parts, then rank each
    shard (exact duplicates, top-k consistency) and write its kept pairs."""
    import pyarrow as pa

    from raylib.ray_data import consistency as cons
    from raylib.ray_data.embed import embed
    from raylib.ray_data.io import write_parquet
    from raylib.reader import ROWS_PER_BATCH

    def keep_unflagged(table: pa.Table) -> pa.Table:
        return table.filter(table.column(cons.STATUS).is_null())

    ds = cons.annotate_heuristics(good, cfg.heuristics)
    ds = ds.map_batches(keep_unflagged, batch_format="pyarrow", batch_size=ROWS_PER_BATCH)
    ds = cons.assign_shards(ds, shards_per_group)
    gpu = cfg.num_gpus_per_actor > 0
    if cfg.consistency:
        ds = embed(ds, model=cfg.model, column="query", kind="query", output_column="_q_emb",
                   max_length=cfg.query_max_tokens,
                   also=[("document", "document", "_d_emb", cfg.document_max_tokens)],
                   concurrency=cfg.concurrency, num_gpus=cfg.num_gpus_per_actor,
                   batch_size=cfg.batch_size, num_cpus=cfg.num_cpus_per_actor,
                   rows_per_call=cfg.rows_per_call, num_threads=cfg.num_threads_per_actor,
                   tokenize_upstream=cfg.tokenize_upstream, stats=stats)
    emb_columns = ["_q_emb", "_d_emb"] if cfg.consistency else []
    scratch_fs, scratch_root = filesystem_for(cfg.scratch)
    parts = ds.drop_columns([cons.STATUS]).map_batches(
        cons.write_shard_parts, fn_args=(scratch_fs, scratch_root, emb_columns),
        batch_format="pyarrow", batch_size=cfg.scratch_batch_rows)
    manifest = cons.shard_manifest(parts)
    stages.done("embed_and_write_parts", num_survivors)
    ranked = cons.filter_shards(manifest, scratch_fs, cfg.top_k if cfg.consistency else None,
                                cfg.heuristics.duplicate, stats, num_cpus=cfg.num_cpus_per_shard,
                                num_gpus=cfg.num_gpus_per_actor if gpu else None,
                                use_gpu=None if gpu else False)
    write_parquet(ranked, cfg.kept)
    if not cfg.keep_scratch:
        cons.delete_scratch(cfg.scratch)


def _summary(cfg: FilterConfig, counts: StatusCounts, totals: dict, num_kept: int,
             planned_shards: int, stages: dict[str, dict], seconds_total: float) -> dict:
    """The job's summary.json; asserts that every input row is accounted for exactly once."""
    dropped = {**counts.dropped, "duplicate": counts.dropped["duplicate"] + totals["duplicate"]}
    if totals["embed_rows"]:  # query + document encoded per pair
        stages["embed_pairs"] = {"rows": totals["embed_rows"],
                                 "actor_seconds": round(totals["embed_seconds"], 2),
                                 "rows_per_s_per_actor": _rate(totals["embed_rows"],
                                                               totals["embed_seconds"])}
    stages["rank_shards"] = {"rows": totals["pairs"], "task_seconds": round(totals["seconds"], 2),
                             "rows_per_s_per_task": _rate(totals["pairs"], totals["seconds"])}
    summary = {
        "input": counts.num_input,
        "rejected": sum(counts.rejected.values()),
        "rejected_by_reason": dict(sorted(counts.rejected.items())),
        "dropped_by_heuristic": dropped,
        "dropped_by_consistency": totals["consistency"],
        "kept": num_kept,
        "shards": {"count": totals["num_shards"], "planned": planned_shards,
                   "min_pairs": totals["shard_pairs_min"], "max_pairs": totals["shard_pairs_max"]},
        "throughput": stages,
        "seconds": round(seconds_total, 2),
        "outputs": {"kept": cfg.kept, "rejects": cfg.rejects},
        "config": asdict(cfg),
    }
    assert totals["pairs"] == counts.num_survivors, (totals["pairs"], counts.num_survivors)
    assert totals["kept"] == num_kept, (totals["kept"], num_kept)
    assert (summary["rejected"] + sum(dropped.values()) + summary["dropped_by_consistency"]
            + num_kept == counts.num_input), summary
    summary["pairs_per_s"] = _rate(counts.num_input, summary["seconds"])
    return summary


def _report_lines(cfg: FilterConfig, summary: dict) -> list[str]:
    """The human-readable report printed before the JSON line."""
    dropped = summary["dropped_by_heuristic"]
    return [f"{summary['input']} pairs in, {summary['kept']} kept -> {cfg.kept}",
            f"rejected {summary['rejected']} {summary['rejected_by_reason']} -> {cfg.rejects}",
            f"dropped by heuristics {sum(dropped.values())} "
            f"{ {k: v for k, v in dropped.items() if v} }, by consistency (top {cfg.top_k}) "
            f"{summary['dropped_by_consistency']}",
            f"{summary['shards']['count']} shards; {seconds(summary['seconds'])} "
            f"({summary['pairs_per_s']} pairs/s)"]


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_job_args(FilterConfig, __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
