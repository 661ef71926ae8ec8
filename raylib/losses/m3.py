"""BGE-M3 self-knowledge distillation (M3 §3.3) over the three heads' scores (M3 §3.2).

  s_inter = w_dense s_dense + w_lex s_lex + w_mul s_mul                       (eq. 2, weighted)
  L_*  = InfoNCE(s_*)  for * in dense, lex, mul, inter                          (eq. 1)
  L'_* = -p(s_inter) . log p(s_*),  p = softmax(. / tau), s_inter detached      (eq. 3)
  L    = (lambda_dense L_dense + L_inter + lambda_lex L_lex + lambda_mul L_mul) / 4
  L'   = (lambda_dense L'_dense + lambda_lex L'_lex + lambda_mul L'_mul) / 3    (eq. 4, weighted)
  L_final = (L + L') / 2

The weights and the normalization follow FlagEmbedding 1.4.2, the reference implementation
(FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py, EncoderOnlyEmbedderM3Model):
`ensemble_score` returns `dense_scores + 0.3 * sparse_scores + colbert_scores` (w = 1, 0.3, 1);
`forward` combines `loss = (loss + ensemble_loss + 0.1 * sparse_loss + colbert_loss) / 4` and,
with use_self_distill, `loss += (dense_self_distill_loss + 0.1 * sparse_self_distill_loss +
colbert_self_distill_loss) / 3; loss = loss / 2` against `softmax(ensemble_scores.detach())`
(lambda = 1, 0.1, 1). Every score is divided by the one temperature before the softmax, as there.

Warm-up (M3 App. B.1: "approximately 6000 steps to perform warm-up on dense embedding, sparse
embedding and multi-vectors. Subsequently, we conducted unified training with self-knowledge
distillation"): for the first `warmup_steps` optimizer steps L_final = L (the per-head and
s_inter InfoNCE losses, no L'), then (L + L') / 2. FlagEmbedding's `self_distill_start_step`
(self-KD when its 0-based step > start) is warmup_steps - 1.

Scores are computed per query against its candidates: its own group (positive + hard negatives)
or, with in-batch negatives, every document given (the local batch or all workers' after a
gather), for all three heads alike. Pure functions of the heads' outputs; no process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raylib.losses.hard_negative import group_targets


@dataclass
class M3Weights:
    """Score weights of s_inter and loss weights per head (defaults: FlagEmbedding 1.4.2)."""

    w_dense: float = 1.0    # modeling.py ensemble_score: dense_scores + ...
    w_lex: float = 0.3      # ... + 0.3 * sparse_scores + ...
    w_mul: float = 1.0      # ... + colbert_scores
    lambda_dense: float = 1.0   # forward: (loss + ensemble_loss + 0.1 * sparse_loss + colbert_loss) / 4
    lambda_lex: float = 0.1
    lambda_mul: float = 1.0
    self_distill: bool = True   # M3 §3.3 trains with L' (FlagEmbedding: --use_self_distill)
    warmup_steps: int = 0       # M3 App. B.1: steps without L' before unified self-KD (paper: ~6000)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"m3.warmup_steps must be >= 0, got {self.warmup_steps}")

    def self_distill_at(self, step: int) -> bool:
        """Whether 0-based optimizer step `step` trains with L' (after the warm-up phase)."""
        return self.self_distill and step >= self.warmup_steps


# ---------------------------------------------------------------------------- candidates
def candidates(docs: torch.Tensor, num_queries: int, group_size: int, in_batch: bool,
               offset: int = 0) -> torch.Tensor:
    """Per-query candidate view of document representations [M, ...] (M = N*G, grouped):
    [B, M, ...] (every document, expanded without a copy) or [B, G, ...] (own group)."""
    if docs.shape[0] % group_size:
        raise ValueError(f"{docs.shape[0]} documents are not whole groups of {group_size}")
    n_groups = docs.shape[0] // group_size
    if offset < 0 or offset + num_queries > n_groups:
        raise ValueError(f"queries {offset}..{offset + num_queries - 1} have no group among {n_groups}")
    if in_batch:
        return docs.unsqueeze(0).expand(num_queries, *docs.shape)
    return docs.reshape(n_groups, group_size, *docs.shape[1:])[offset:offset + num_queries]


# ---------------------------------------------------------------------------- the three scores
def dense_scores(q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """s_dense = <e_q, e_p>: q [B, D], cand [B, C, D] -> [B, C]."""
    return torch.einsum("bd,bcd->bc", q, cand)


def lexical_vectors(weights: torch.Tensor, input_ids: torch.Tensor,
                    vocab: torch.Tensor) -> torch.Tensor:
    """Max weight per distinct token, differentiably: weights, input_ids [N, L], vocab [U] sorted
    unique ids (covering input_ids) -> [N, U]. Zero weights (padding, special tokens) add nothing."""
    index = torch.searchsorted(vocab, input_ids)  # [N, L] column of each token
    out = torch.zeros(weights.shape[0], vocab.shape[0], dtype=weights.dtype, device=weights.device)
    return out.scatter_reduce(1, index, weights, reduce="amax", include_self=True)  # [N, U]


def lexical_scores(q_weights: torch.Tensor, q_ids: torch.Tensor, d_weights: torch.Tensor,
                   d_ids: torch.Tensor, group_size: int, in_batch: bool,
                   offset: int = 0) -> torch.Tensor:
    """s_lex = sum over tokens in both of w_qt * w_pt (M3 §3.2).

    q_weights, q_ids [B, Lq]; d_weights, d_ids [M, Ld] (M = N*G grouped documents) -> [B, C].
    """
    vocab = torch.unique(torch.cat([q_ids.reshape(-1), d_ids.reshape(-1)]))  # [U] sorted
    q_vec = lexical_vectors(q_weights, q_ids, vocab)  # [B, U]
    d_vec = lexical_vectors(d_weights, d_ids, vocab)  # [M, U]
    if in_batch:
        return q_vec @ d_vec.T  # [B, M]
    own = candidates(d_vec, q_vec.shape[0], group_size, False, offset)  # [B, G, U]
    return torch.einsum("bu,bgu->bg", q_vec, own)


def multivector_scores(q_vecs: torch.Tensor, q_mask: torch.Tensor, cand_vecs: torch.Tensor,
                       cand_mask: torch.Tensor) -> torch.Tensor:
    """s_mul = 1/N sum_i max_j E_q[i] . E_p[j] (M3 §3.2) over real tokens only.

    q_vecs [B, Lq, H], q_mask [B, Lq]; cand_vecs [B, C, Ld, H], cand_mask [B, C, Ld] -> [B, C].
    """
    sim = torch.einsum("bih,bcjh->bcij", q_vecs, cand_vecs)  # [B, C, Lq, Ld]
    sim = sim.masked_fill(~cand_mask.bool()[:, :, None, :], float("-inf"))
    best = sim.max(-1).values  # [B, C, Lq]
    best = best.masked_fill(~q_mask.bool()[:, None, :], 0.0)
    return best.sum(-1) / q_mask.sum(-1, keepdim=True).clamp(min=1).to(best.dtype)


# ---------------------------------------------------------------------------- the loss
def m3_self_distill_loss(s_dense: torch.Tensor, s_lex: torch.Tensor, s_mul: torch.Tensor,
                         targets: torch.Tensor, temperature: float = 0.02,
                         weights: M3Weights | None = None,
                         step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_final of the module docstring from the three heads' scores [B, C] and the positive's
    column per query, targets [B]; `step` (0-based, None = after any warm-up) decides whether
    L' is on. Returns (loss, parts) with parts detached for logging."""
    w = weights or M3Weights()
    self_distill = w.self_distill if step is None else w.self_distill_at(step)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not s_dense.shape == s_lex.shape == s_mul.shape:
        raise ValueError(f"score shapes differ: dense {tuple(s_dense.shape)}, lex "
                         f"{tuple(s_lex.shape)}, mul {tuple(s_mul.shape)}")
    logits = {"dense": s_dense.float() / temperature, "lex": s_lex.float() / temperature,
              "mul": s_mul.float() / temperature}  # each [B, C]
    lam = {"dense": w.lambda_dense, "lex": w.lambda_lex, "mul": w.lambda_mul}
    inter = w.w_dense * logits["dense"] + w.w_lex * logits["lex"] + w.w_mul * logits["mul"]
    ce = {k: F.cross_entropy(v, targets) for k, v in logits.items()}
    ce["inter"] = F.cross_entropy(inter, targets)
    loss = (sum(lam[k] * ce[k] for k in lam) + ce["inter"]) / 4
    parts = {f"loss_{k}": v.detach() for k, v in ce.items()}
    if self_distill:
        p_inter = F.softmax(inter.detach(), dim=-1)  # the teacher: softmax(s_inter) [B, C]
        kd = {k: -(p_inter * F.log_softmax(v, dim=-1)).sum(-1).mean() for k, v in logits.items()}
        loss_prime = sum(lam[k] * kd[k] for k in lam) / 3
        loss = (loss + loss_prime) / 2
        parts.update({f"self_distill_{k}": v.detach() for k, v in kd.items()})
    return loss, parts


def m3_head_scores(q: dict[str, torch.Tensor], d: dict[str, torch.Tensor], group_size: int,
                   in_batch: bool, offset: int = 0) -> dict[str, torch.Tensor]:
    """s_dense, s_lex, s_mul [B, C] from Encoder.forward outputs (+ input_ids) of queries and
    grouped documents; keys of q and d: dense, sparse, multivector, mask, input_ids."""
    b = q["dense"].shape[0]
    cand = lambda t: candidates(t, b, group_size, in_batch, offset)  # noqa: E731
    return {
        "dense": dense_scores(q["dense"], cand(d["dense"])),
        "lex": lexical_scores(q["sparse"], q["input_ids"], d["sparse"], d["input_ids"],
                              group_size, in_batch, offset),
        "mul": multivector_scores(q["multivector"], q["mask"][:, 1:],
                                  cand(d["multivector"]), cand(d["mask"][:, 1:])),
    }


def m3_loss(q: dict[str, torch.Tensor], d: dict[str, torch.Tensor], group_size: int,
            temperature: float = 0.02, in_batch: bool = False, offset: int = 0,
            weights: M3Weights | None = None,
            step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Scores of the three heads + m3_self_distill_loss. Returns (loss, parts, scores)."""
    scores = m3_head_scores(q, d, group_size, in_batch, offset)
    targets = group_targets(q["dense"].shape[0], group_size, offset, in_batch, q["dense"].device)
    loss, parts = m3_self_distill_loss(scores["dense"], scores["lex"], scores["mul"], targets,
                                       temperature, weights, step)
    return loss, parts, scores
