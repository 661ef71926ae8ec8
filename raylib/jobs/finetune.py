"""Finetune an embedding model on mined hard negatives with Ray Train (Arctic-Embed 2.0 App. C), or
train BGE-M3's dense, sparse and multi-vector heads with self-knowledge distillation (M3 §3.3).

  python jobs/finetune.py --config jobs/configs/finetune/debug.yaml [--set objective.mode=m3 ...]
  ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune/h100.yaml

Input: the mining job's Parquet (query, positive, negatives, positive_score, negative_scores, source,
language). The training loop, data plan, checkpoints and config sections are the pretraining
job's (raylib.train_config, raylib.ray_train.loop); this job adds the `objective` section (the
FinetuneObjective itself) and the optional `length_grouping` section (M3 §3.4). Checkpoints are
model directories in the BGE-M3 layout (colbert_linear.pt, sparse_linear.pt when the model has
those heads). Output location: `<checkpoint.storage_path>/<checkpoint.name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from raylib.config import parse_job_args
from raylib.objectives.finetune import FinetuneObjective, LengthGroupingSection
from raylib.train_config import CheckpointSection, TrainJobConfig


@dataclass
class FinetuneJobConfig(TrainJobConfig):
    """The training loop's sections + the finetuning objective and length grouping."""

    objective: FinetuneObjective = field(default_factory=FinetuneObjective)
    length_grouping: LengthGroupingSection = field(default_factory=LengthGroupingSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(name="finetune"))

    def __post_init__(self) -> None:
        if self.objective.mode == "m3":  # M3 mode trains all three heads: a dense model gets new ones
            self.model.m3_heads = True


def apply_length_grouping(cfg: FinetuneJobConfig) -> dict:
    """Tag every row's source with its length bucket (M3 §3.4) and point data.paths at the tagged
    copy (<run dir>/length_grouped.parquet). Reads the (finetuning-sized) input on the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylib.batching import bucket_sources
    from raylib.objectives.finetune import group_lengths
    from raylib.ray_train.loop import load_encoder, run_dir

    if cfg.data.format != "parquet":
        raise ValueError("length_grouping needs data.format: parquet (the mining job's output)")
    table = pa.concat_tables([pq.read_table(p) for p in cfg.data.paths])
    rows = table.to_pydict()
    encoder = load_encoder(cfg.model, cfg.train.seed)
    lengths = group_lengths(encoder, rows, cfg.objective.num_negatives, cfg.objective.document_max_length)
    sources = bucket_sources([str(s) for s in rows["source"]], lengths, cfg.length_grouping.bounds)
    table = table.set_column(table.column_names.index("source"), "source", pa.array(sources))
    out = run_dir(cfg) / "length_grouped.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    cfg.data.paths = [str(out)]
    cfg.data.source_batch_sizes = {**cfg.data.source_batch_sizes, **cfg.length_grouping.source_batch_sizes()}
    counts: dict[str, int] = {}
    for s in sources:
        counts[s] = counts.get(s, 0) + 1
    return {"path": str(out), "rows_per_source_bucket": counts,
            "batch_sizes": cfg.data.source_batch_sizes}


def run(cfg: FinetuneJobConfig) -> dict:
    """Finetune; writes summary.json into the run's storage location, reports, returns the summary."""
    from raylib.jobs.summary import finish_training
    from raylib.ray_train.loop import fit

    grouping = apply_length_grouping(cfg) if cfg.length_grouping.bounds else None
    result = fit(cfg, cfg.objective)
    if grouping is not None:
        result["length_grouping"] = grouping
    return finish_training("finetune", cfg, result)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_job_args(FinetuneJobConfig, __doc__.split("\n")[0], argv)
    try:
        return run(cfg)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()
