"""Contrastive pretraining on Ray Train (Arctic-Embed 2.0 App. C).

  python jobs/pretrain.py --config jobs/configs/pretrain/debug.yaml [--set train.lr=3e-5 ...]
  ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain/h100.yaml

InfoNCE (tau 0.02) against in-batch documents gathered from all workers, Matryoshka prefixes,
gradient caching, WSD schedule, checkpoints (loadable model dirs) with exact resume. The pairs are
first prepared (raylib.jobs.prepare: pre-tokenized per-source shards, a Ray Data job) into
`<output>/prepared`, or read from `data.prepared` when it names a prepared location; Train workers
stream their rows of each step from there. The `loss` section is the objective itself
(raylib.objectives.ContrastiveObjective). Output location:
`<checkpoint.storage_path>/<checkpoint.name>` (checkpoints, metrics.jsonl, curves.png, summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from raylib.config import parse_job_args
from raylib.objectives import ContrastiveObjective
from raylib.train_config import TrainJobConfig


@dataclass
class SyntheticSection:
    """Write a toy pair set to data.paths[0] first (debug runs and tests; 0 rows = off)."""

    rows: int = 0
    sources: dict = field(default_factory=lambda: {"web/en": 1.0})
    seed: int = 0


@dataclass
class PretrainConfig(TrainJobConfig):
    loss: ContrastiveObjective = field(default_factory=ContrastiveObjective)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


def write_synthetic(cfg: PretrainConfig) -> None:
    """The synthetic pair set of the debug config, written to data.paths[0] (local or s3://)."""
    import pyarrow.parquet as pq

    from raylib.train_data import synthetic_pairs
    from raylib.storage import filesystem_for

    if not cfg.data.paths:
        raise ValueError("synthetic.rows needs data.paths[0] to write to")
    fs, path = filesystem_for(cfg.data.paths[0])
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    table = synthetic_pairs(cfg.synthetic.rows, cfg.synthetic.sources, cfg.synthetic.seed)
    pq.write_table(table, path, filesystem=fs)


def run(cfg: PretrainConfig) -> dict:
    """Pretrain; writes summary.json into the run's storage location, reports, returns the summary."""
    from raylib.jobs.prepare import prepare_for_training
    from raylib.jobs.summary import finish_training
    from raylib.ray_train.loop import fit
    from raylib.training import check_scaling

    check_scaling(cfg)
    if cfg.synthetic.rows > 0:
        write_synthetic(cfg)
    prepared = prepare_for_training(cfg, cfg.loss)  # a Ray Data job, or a matching manifest reused
    return finish_training("pretrain", cfg, fit(cfg, cfg.loss, prepared, "pretrain"))


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_job_args(PretrainConfig, __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
