"""Training objectives (plain PyTorch, no Ray): each is also its job's config section."""

from raylib.objectives.base import Objective
from raylib.objectives.contrastive import ContrastiveObjective
from raylib.objectives.finetune import FinetuneObjective

__all__ = ["ContrastiveObjective", "FinetuneObjective", "Objective"]
