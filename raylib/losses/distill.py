"""Distillation from stored teacher scores: KL(p_teacher || p_student) over each query's group
(its positive + hard negatives), p = softmax(scores / tau). The mining job stores the teacher's
positive_score and negative_scores; M3's FlagEmbedding uses the same target (teacher softmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
               temperature: float = 0.02, teacher_temperature: float = 0.02,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over queries of KL(softmax(t / tau_t) || softmax(s / tau)).

    student_scores, teacher_scores: [B, G] (column 0 = positive); mask: optional [B, G] bool,
    False for missing candidates (padding), which get no probability on either side.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student scores {tuple(student_scores.shape)} and teacher scores "
                         f"{tuple(teacher_scores.shape)} differ in shape")
    if temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("temperatures must be > 0")
    s = student_scores.float() / temperature  # [B, G]
    t = teacher_scores.detach().float().to(s.device) / teacher_temperature  # [B, G]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        t = t.masked_fill(~mask, float("-inf"))
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    p_t = log_p_t.exp()
    terms = p_t * (log_p_t - log_p_s)  # [B, G]
    terms = torch.where(p_t > 0, terms, torch.zeros_like(terms))  # 0 * log 0 = 0 (masked cells)
    return terms.sum(-1).mean()
