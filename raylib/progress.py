"""One-line progress reports a person can read off a terminal or a pipe: the training step line and
the data stage line (rows done, rate, time left). Pure formatting, no Ray."""

from __future__ import annotations

LOSS_PARTS = ("loss_", "loss@", "teacher_kl", "self_distill", "info_nce", "distill")


def clock(seconds: float | None) -> str:
    """62.4 -> '0:01:02'; None -> '?'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def loss_parts(record: dict) -> dict[str, float]:
    """The parts of the loss a step record carries (per head, per Matryoshka dim, distillation)."""
    return {k: v for k, v in record.items() if k != "loss" and k.startswith(LOSS_PARTS)}


def step_line(record: dict, total_steps: int, elapsed_s: float, steps_done: int) -> str:
    """`step 12/30 loss 1.2345 (loss@16 1.1 teacher_kl_dense 0.13) lr 2.00e-05 45.3 ex/s 1,234 tok/s
    elapsed 0:01:02 left 0:00:40`; `steps_done` steps of this attempt took `elapsed_s`."""
    parts = loss_parts(record)
    inner = " (" + " ".join(f"{k} {v:.4g}" for k, v in parts.items()) + ")" if parts else ""
    left = elapsed_s / steps_done * (total_steps - record["step"]) if steps_done else None
    mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
    evals = "".join(f" {k} {v:.4f}" for k, v in record.items() if k.startswith("eval/"))
    return (f"step {record['step']}/{total_steps} loss {record['loss']:.4f}{inner} lr {record['lr']:.2e} "
            f"{record['examples_per_s']:.1f} ex/s {record['tokens_per_s']:,.0f} tok/s{mfu}{evals} "
            f"elapsed {clock(elapsed_s)} left {clock(left)}")


def stage_line(name: str, done: int, total: int | None, elapsed_s: float) -> str:
    """`[data] ReadParquet->Map(tokenize): 1,234/5,000 rows (25%) 123 rows/s, left 0:00:31`."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        left = clock((total - done) / rate) if rate > 0 else "?"
        return f"[data] {name}: {done:,}/{total:,} rows ({done / total:.0%}) {rate:,.0f} rows/s, left {left}"
    return f"[data] {name}: {done:,} rows {rate:,.0f} rows/s"
