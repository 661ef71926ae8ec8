"""Teacher scoring and hard-negative mining (Arctic-Embed 2.0 §2.4 TopK-PercPos, BGE-M3 rank window).

  python jobs/mine.py --config jobs/configs/mine/debug.yaml [--set strategy=rank_window ...]
  ray job submit --working-dir . -- python jobs/mine.py --config jobs/configs/mine/h100.yaml

Reads pairs (Parquet/JSONL, local or s3://) or a BEIR split, embeds the corpus and the queries with
the teacher in Ray Data actor pools, searches sharded FAISS indexes, selects negatives and writes
Parquet (query, positive, negatives, positive_score, negative_scores, source, language, ids) to
`<output>/mined`, with `rejects/`, `too_few/` and `summary.json` beside it. The Ray stages are
raylib.ray_data.mining; the selection logic is raylib.mining; the job's body is `run_mining` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from raylib import mining as M
from raylib.config import parse_job_args
from raylib.jobs.summary import finish, seconds
from raylib.model import ModelSpec
from raylib.storage import join


@dataclass
class InputConfig:
    kind: str = "pairs"            # pairs (a table) | beir (a BEIR dir + split)
    path: str = ""                 # pairs: Parquet/JSONL file(s) or dir, local or s3://; beir: the dir
    split: str = "train"           # beir: qrels/<split>.tsv
    corpus: str | None = None      # extra documents (column `document`, optional `id`); pairs' documents are always in
    max_chars: int | None = None   # pairs longer than this (query or document) are rejected
    source: str | None = None      # beir: source label (default: the dir name)
    language: str = "en"           # beir: language label


@dataclass
class ResourcesConfig:
    embed_concurrency: int = 1
    embed_num_gpus: float = 0
    embed_num_cpus: float = 0.5
    embed_num_threads: int | None = None  # torch threads per embedding actor (None: Ray's, from num_cpus)
    tokenize_upstream: bool | None = None  # token ids from CPU tasks before the actors (None: on GPU only)
    embed_batch_size: int = 64
    max_length: int | None = None      # teacher max tokens (None: the model's own)
    mine_concurrency: int = 1
    mine_batch_size: int = 256         # queries per search call
    mine_num_cpus: float = 0.5
    shard_num_cpus: float = 0.5
    shard_num_gpus: float = 0          # > 0: shards reserve a GPU and use a FAISS GPU index
    corpus_batch_size: int = 4096      # corpus rows routed to shards per driver step
    ray_num_cpus: int | None = 8       # only when this job starts a local Ray (tokens, not cores)


@dataclass
class MineJobConfig:
    teacher: str | ModelSpec = "minilm"  # model dir or name, or a ModelSpec mapping (pooling, prefixes, trust_remote_code)
    candidates: int = 100              # top-K retrieved per query before filtering
    num_negatives: int = 10
    strategy: str = "topk_percpos"     # topk_percpos | topk_abs | rank_window
    max_pos_ratio: float = 0.95
    max_score: float | None = None
    range_min: int = 0
    range_max: int = 200
    too_few: str = "drop"              # drop | pad
    pos_reference: str = "min"         # min | pair
    order: str = "random"              # random | margin | mean_neg | min_neg
    seed: int = 0
    max_docs_per_shard: int | None = 1_000_000  # a cap on top of the byte budget (index.memory_bytes)
    histogram_bins: int = 20           # teacher score histograms in the summary
    index: M.IndexBudget = field(default_factory=M.IndexBudget)  # shard indexes sized by bytes
    input: InputConfig = field(default_factory=InputConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: str = "runs/mine"          # the job's output location (local or s3://): mined/ (what
                                       # finetuning reads), rejects/, too_few/, summary.json

    @property
    def outputs(self) -> dict[str, str]:
        """Where each output table goes, inside `output`."""
        names = ("mined", "rejects", "too_few", "corpus_rejects")
        return {name: join(self.output, name) for name in names}

    def __post_init__(self) -> None:
        self.index.validate()

    def rule(self) -> M.NegativeRule:
        return M.NegativeRule(strategy=self.strategy, num_negatives=self.num_negatives,
                              max_pos_ratio=self.max_pos_ratio, max_score=self.max_score,
                              range_min=self.range_min, range_max=self.range_max,
                              too_few=self.too_few, pos_reference=self.pos_reference).validate()

    def validate(self) -> "MineJobConfig":
        self.rule()
        if self.order not in M.ORDERS:
            raise ValueError(f"order {self.order!r} is not one of {M.ORDERS}")
        if self.input.kind not in ("pairs", "beir"):
            raise ValueError(f"input.kind {self.input.kind!r} is not one of ('pairs', 'beir')")
        if not self.input.path:
            raise ValueError("input.path is required")
        if not self.output:
            raise ValueError("output is required")
        if self.candidates < self.num_negatives:
            raise ValueError(f"candidates ({self.candidates}) < num_negatives ({self.num_negatives})")
        if self.strategy == "rank_window" and self.range_max > self.candidates:
            raise ValueError(f"range_max ({self.range_max}) > candidates ({self.candidates}): "
                             "the window must lie inside the retrieved list")
        return self


def index_budget(cfg: MineJobConfig) -> M.IndexBudget:
    """The job's index byte budget (its `index:` section)."""
    return cfg.index.validate()


def shard_plan(cfg: MineJobConfig, num_docs: int, dim: int) -> M.ShardPlan:
    """Shards of `num_docs` teacher vectors of `dim` under the job's budget (GPU shards: GPU bytes)."""
    r = cfg.resources
    return M.plan_shards(num_docs, dim, index_budget(cfg), cfg.candidates, r.mine_batch_size,
                         on_gpu=r.shard_num_gpus > 0, max_docs_per_shard=cfg.max_docs_per_shard)


def run_mining(cfg: MineJobConfig) -> dict:
    """Run the mining stages (raylib.ray_data.mining) on the current Ray cluster; returns the
    summary dict (`run` writes it and reports)."""
    import time
    from dataclasses import asdict

    import numpy as np
    import pyarrow.compute as pc
    import ray

    from raylib.ray_data.embed import embed
    from raylib.ray_data.io import read_table, split_rejects, write_parquet
    from raylib.ray_data.mining import (MineBatch, beir_inputs, build_shards, count_reasons, drop_internal,
                                        given_corpus, keep_with_key, normalize_pairs, positives_table)
    from raylib.reader import ROWS_PER_BATCH

    cfg.validate()
    start = time.time()
    r = cfg.resources
    mined_path, rejects_path, too_few_path = cfg.outputs["mined"], cfg.outputs["rejects"], cfg.outputs["too_few"]

    corpus_rejected: dict[str, int] = {}
    if cfg.input.kind == "beir":
        good, rejects, corpus, n_input, corpus_rejected = beir_inputs(cfg.input)
    else:
        good, rejects = split_rejects(read_table(cfg.input.path), ["query", "document"],
                                      cfg.input.max_chars)
        corpus, n_input = None, None
    pairs = good.map_batches(normalize_pairs, batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH).materialize()
    rejects = rejects.materialize()
    rejected = count_reasons(rejects)
    pair_docs = pairs.select_columns(["document", "positive_id"]).rename_columns({"positive_id": "doc_id"})
    # the pairs' documents always enter the corpus (first, so their ids win on duplicates)
    corpus = pair_docs if corpus is None else pair_docs.union(corpus)
    if cfg.input.corpus:
        extra, extra_rej = given_corpus(cfg.input.corpus, cfg.input.max_chars)
        corpus = corpus.union(extra)
        extra_rejected = count_reasons(extra_rej)
        for reason, n in extra_rejected.items():
            corpus_rejected[reason] = corpus_rejected.get(reason, 0) + n
        if extra_rejected:
            write_parquet(extra_rej, cfg.outputs["corpus_rejects"])
    corpus = corpus.materialize()
    n_pairs = pairs.count()
    if n_input is None:  # split_rejects puts every input row in exactly one of good / rejects
        n_input = n_pairs + sum(rejected.values())
    if n_pairs == 0:
        raise ValueError(f"no valid pairs in {cfg.input.path} (rejected: {rejected})")

    num_docs = corpus.count()
    shards, shard_info = build_shards(corpus, cfg.teacher, r, index_budget(cfg),
                                      lambda dim: shard_plan(cfg, num_docs, dim))

    keys = pairs.select_columns(["q_key", "d_key"]).to_pandas()
    table = positives_table(keys["q_key"].to_numpy(np.int64), keys["d_key"].to_numpy(np.int64))
    del keys
    positives_ref = ray.put(table)

    with_q = embed(pairs, cfg.teacher, "query", "query", "q_emb", concurrency=r.embed_concurrency,
                   num_gpus=r.embed_num_gpus, batch_size=r.embed_batch_size, num_cpus=r.embed_num_cpus,
                   max_length=r.max_length, num_threads=r.embed_num_threads,
                   tokenize_upstream=r.tokenize_upstream)
    mined = with_q.map_batches(
        MineBatch,
        fn_constructor_kwargs=dict(shards=shards, positives=[positives_ref], rule=asdict(cfg.rule()),
                                   candidates=cfg.candidates, seed=cfg.seed, order=cfg.order),
        compute=ray.data.ActorPoolStrategy(size=r.mine_concurrency),
        batch_size=r.mine_batch_size, batch_format="numpy", num_cpus=r.mine_num_cpus,
    ).materialize()

    counts = {"kept": 0, "padded": 0, "dropped_too_few": 0}
    pos_hist = M.ScoreHistogram(bins=cfg.histogram_bins)
    neg_hist = M.ScoreHistogram(bins=cfg.histogram_bins)
    for batch in mined.select_columns(["status", "positive_score", "negative_scores"]).iter_batches(
            batch_format="pyarrow", batch_size=65536):
        status = np.asarray(batch.column("status").to_pylist(), dtype=object)
        ok = status != M.TOO_FEW_STATUS
        counts["kept"] += int(ok.sum())
        counts["padded"] += int((status == M.PADDED).sum())
        counts["dropped_too_few"] += int((~ok).sum())
        pos_hist.add(batch.column("positive_score").to_numpy(zero_copy_only=False)[ok])
        neg_hist.add(pc.list_flatten(batch.column("negative_scores")).to_numpy(zero_copy_only=False))

    kept = mined.map_batches(drop_internal, fn_args=(True,), batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH)
    if cfg.order == "random":
        kept = kept.random_shuffle(seed=cfg.seed)
    else:  # increasing negative hardness (Arctic 2.0 Fig. 2); the key is recomputed from the output
        kept = mined.map_batches(keep_with_key, batch_format="pyarrow", num_cpus=0.25,
                                 batch_size=ROWS_PER_BATCH) \
            .sort("order_key").drop_columns(["order_key"])
    write_parquet(kept, mined_path)
    if counts["dropped_too_few"]:
        write_parquet(mined.map_batches(drop_internal, fn_args=(False,), batch_format="pyarrow",
                                        num_cpus=0.25, batch_size=ROWS_PER_BATCH), too_few_path)
    if rejected:
        write_parquet(rejects, rejects_path)
    for s in shards:
        ray.kill(s)

    n_rejected = sum(rejected.values())
    summary = {
        "teacher": cfg.teacher, "strategy": cfg.strategy, "order": cfg.order,
        "counts": {"input": n_input, "rejected": n_rejected, "rejected_by_reason": rejected,
                   "pairs": n_pairs, "dropped_too_few": counts["dropped_too_few"],
                   "padded": counts["padded"], "kept": counts["kept"],
                   "adds_up": (n_input == n_rejected + n_pairs
                               and n_pairs == counts["dropped_too_few"] + counts["kept"])},
        "corpus": {**shard_info, "rejected_by_reason": corpus_rejected},
        "histograms": {"positive_score": pos_hist.to_dict(), "negative_score": neg_hist.to_dict()},
        "outputs": {"mined": mined_path, "rejects": rejects_path if rejected else None,
                    "too_few": too_few_path if counts["dropped_too_few"] else None},
        "config": asdict(cfg),
        "seconds": round(time.time() - start, 1),
    }
    if not summary["counts"]["adds_up"]:
        raise AssertionError(f"mining counts do not add up: {summary['counts']}")
    return summary


def run(cfg: MineJobConfig) -> dict:
    """Mine on a joined or local Ray; writes <output>/summary.json, reports, returns the summary."""
    from raylib.ray_env import init_data_ray

    cfg.validate()
    init_data_ray(cfg.resources.ray_num_cpus)
    summary = run_mining(cfg)
    c = summary["counts"]
    lines = [f"{c['input']} pairs in, {c['kept']} mined ({c['padded']} padded) -> {summary['outputs']['mined']}",
             f"rejected {c['rejected']} {c['rejected_by_reason']}, too few negatives {c['dropped_too_few']}",
             f"corpus {summary['corpus'].get('docs')} documents in {summary['corpus'].get('shards')} index shards; "
             f"teacher {cfg.teacher}, {cfg.strategy}; {seconds(summary['seconds'])}"]
    return finish("mine", summary, cfg.output, lines)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_job_args(MineJobConfig, __doc__.split("\n")[0], argv)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    return run(cfg)


if __name__ == "__main__":
    main()
