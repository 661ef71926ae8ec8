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
from raylib.jobs.summary import config_errors_exit
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
    """M3 §3.4 length grouping through the prepare stage (raylib.jobs.prepare, a Ray Data job): each
    row's source is tagged with its length bucket there (the longest of its positive and first
    num_negatives negatives, in tokens), and each bucket gets its own global batch size. Points
    data.prepared at the result (local or s3://, no file only the driver can see)."""
    from raylib.jobs.prepare import prepare_for_training

    cfg.data.length_bounds = list(cfg.length_grouping.bounds)
    cfg.data.source_batch_sizes = {**cfg.data.source_batch_sizes, **cfg.length_grouping.source_batch_sizes()}
    prepared = prepare_for_training(cfg, cfg.objective)
    cfg.data.prepared = prepared["location"]
    return {"path": prepared["location"], "rows_per_source_bucket": {s: v["rows"] for s, v in
                                                                     prepared["sources"].items()},
            "batch_sizes": cfg.data.source_batch_sizes}


def run(cfg: FinetuneJobConfig) -> dict:
    """Finetune; writes summary.json into the run's storage location, reports, returns the summary."""
    from raylib.jobs.prepare import prepare_for_training
    from raylib.jobs.summary import finish_training
    from raylib.ray_train.loop import fit
    from raylib.training import check_scaling

    check_scaling(cfg)
    grouping = apply_length_grouping(cfg) if cfg.length_grouping.bounds else None
    prepared = prepare_for_training(cfg, cfg.objective)  # a Ray Data job, or a matching manifest reused
    result = fit(cfg, cfg.objective, prepared, "finetune")
    if grouping is not None:
        result["length_grouping"] = grouping
    return finish_training("finetune", cfg, result)


def main(argv: Sequence[str] | None = None) -> dict:
    return config_errors_exit(run, parse_job_args(FinetuneJobConfig, __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
