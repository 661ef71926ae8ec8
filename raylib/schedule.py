"""Warmup-stable-decay learning rate (Hu et al., 2024; Arctic-Embed 2.0 App. C): linear warmup to the
peak, constant, then linear decay to min_ratio x peak over the last steps."""

from __future__ import annotations

import torch


def resolve_steps(value: int | float, total_steps: int, name: str) -> int:
    """A length in steps (an integer >= 0) or as a fraction of total_steps (a float in (0, 1))."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected steps or a fraction, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}: a fraction must be in (0, 1), got {value}")
        return int(round(value * total_steps))
    steps = int(value)
    if steps < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return steps


def wsd_factor(step: int, total_steps: int, warmup: int | float = 0, decay: int | float = 0,
               min_ratio: float = 0.0) -> float:
    """LR multiplier at `step` (0-based; the LR used for the step-th optimizer update)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    w = resolve_steps(warmup, total_steps, "warmup")
    d = resolve_steps(decay, total_steps, "decay")
    if w + d > total_steps:
        raise ValueError(f"warmup ({w}) + decay ({d}) steps exceed total_steps ({total_steps})")
    if step < w:
        return (step + 1) / w
    decay_start = total_steps - d
    if step >= decay_start and d > 0:
        progress = (step - decay_start) / d  # 0 at the first decay step, (d-1)/d at the last
        return 1.0 - (1.0 - min_ratio) * progress
    return 1.0


def wsd_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int | float = 0,
                  decay: int | float = 0, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with the WSD multiplier; call .step() after each optimizer.step()."""
    wsd_factor(0, total_steps, warmup, decay, min_ratio)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: wsd_factor(step, total_steps, warmup, decay, min_ratio))
