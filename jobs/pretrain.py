"""Contrastive pretraining on Ray Train (Arctic-Embed 2.0 App. C); the last stdout line is one JSON object.

  python jobs/pretrain.py --config jobs/configs/pretrain/debug.yaml [--set train.lr=3e-5 ...]
  ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain/h100.yaml

InfoNCE (tau 0.02) against in-batch documents gathered from all workers, Matryoshka prefixes,
gradient caching, WSD schedule, checkpoints (loadable model dirs) with exact resume.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylib.config import parse_job_args  # noqa: E402
from raylib.ray_train.loop import (CheckpointSection, DataSection, ModelSection,  # noqa: E402,F401
                                   ScalingSection, TrainJobConfig, TrainSection, fit, print_summary)
from raylib.ray_train.objective import ContrastiveObjective  # noqa: E402


@dataclass
class ContrastiveSection:
    """The pretraining loss (raylib.ray_train.objective.ContrastiveObjective)."""

    temperature: float = 0.02
    query_max_length: int = 32
    document_max_length: int = 256
    gather_documents: bool = True
    gather_queries: bool = False
    symmetric: bool = False
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)
    full_weight: float = 1.0


@dataclass
class SyntheticSection:
    """Write a toy pair set to data.paths[0] first (debug runs and tests; 0 rows = off)."""

    rows: int = 0
    sources: dict = field(default_factory=lambda: {"web/en": 1.0})
    seed: int = 0


@dataclass
class PretrainConfig(TrainJobConfig):
    loss: ContrastiveSection = field(default_factory=ContrastiveSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


def contrastive_objective(cfg: PretrainConfig) -> ContrastiveObjective:
    """The objective factory handed to the loop (top level: it is pickled to the workers)."""
    loss = cfg.loss
    return ContrastiveObjective(
        temperature=loss.temperature, query_max_length=loss.query_max_length,
        document_max_length=loss.document_max_length, gather_documents=loss.gather_documents,
        gather_queries=loss.gather_queries, symmetric=loss.symmetric,
        matryoshka_dims=list(loss.matryoshka_dims), matryoshka_weights=list(loss.matryoshka_weights),
        full_weight=loss.full_weight)


def write_synthetic(cfg: PretrainConfig) -> None:
    if cfg.synthetic.rows <= 0:
        return
    import pyarrow.parquet as pq

    from raylib.ray_train.data import synthetic_pairs

    if not cfg.data.paths or "://" in cfg.data.paths[0]:
        raise ValueError("synthetic.rows needs a local data.paths[0] to write to")
    path = Path(cfg.data.paths[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(synthetic_pairs(cfg.synthetic.rows, cfg.synthetic.sources, cfg.synthetic.seed), path)


if __name__ != "__main__":
    # imported (by tests or jobs/finetune.py) rather than run: Ray workers cannot import a job file
    # by module name, so its config classes and objective factory travel by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(PretrainConfig, __doc__.split("\n")[0], argv)
    write_synthetic(cfg)
    summary = fit(cfg, contrastive_objective)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
