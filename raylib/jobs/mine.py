"""Teacher scoring and hard-negative mining (Arctic-Embed 2.0 §2.4 TopK-PercPos, BGE-M3 rank window).

  python jobs/mine.py --config jobs/configs/mine/debug.yaml [--set strategy=rank_window ...]
  ray job submit --working-dir . -- python jobs/mine.py --config jobs/configs/mine/h100.yaml

Reads pairs (Parquet/JSONL, local or s3://) or a BEIR split, embeds the corpus and the queries with
the teacher in Ray Data actor pools, searches sharded FAISS indexes, selects negatives and writes
Parquet (query, positive, negatives, positive_score, negative_scores, source, language, ids) to
`<output>/mined`, with `rejects/`, `too_few/` and `summary.json` beside it. The stages are
raylib.ray_data.mining; the selection logic is raylib.mining.
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


def run(cfg: MineJobConfig) -> dict:
    """Mine on a joined or local Ray; writes <output>/summary.json, reports, returns the summary."""
    from raylib.jobs.ray_env import init_data_ray
    from raylib.ray_data.mining import run_mining

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
