"""Finetuning objective for the training loop (raylib.ray_train.loop): 1 query + 1 positive +
n mined hard negatives per row (Arctic-Embed 2.0 App. C), or BGE-M3's three heads with
self-knowledge distillation (M3 §3.2-3.3).

Rows are the mining job's output: query, positive, negatives (list), positive_score,
negative_scores (list), source, language. Each row becomes a group of G = 1 + n documents, the
positive first. The loss is InfoNCE over the group, optionally widened with in-batch or
cross-worker negatives (for all three heads in M3 mode; FlagEmbedding gathers only the dense
head's), plus optional Matryoshka (Arctic §2.5) and distillation from the stored teacher scores.

Like raylib.objectives.contrastive this module imports no Ray; the gathers are no-ops without a
process group, so the objective is testable in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from raylib.losses.distill import teacher_kl
from raylib.losses.gather import all_gather_offset, all_gather_with_grad, world
from raylib.losses.hard_negative import group_targets, hard_negative_infonce, own_group_scores
from raylib.losses.m3 import M3Weights, m3_head_scores, m3_self_distill_loss
from raylib.losses.matryoshka import matryoshka_loss
from raylib.model import Encoder
from raylib.objectives.base import pad_tokens, side_ids

NEGATIVE_MODES = ("hard", "in_batch", "cross_worker")
REQUIRED = ("query", "positive", "negatives")


@dataclass
class Groups:
    """One batch's groups: documents flattened row-major [B*G], the positive first in each (texts,
    or token id rows for prepared rows)."""

    documents: list
    teacher: torch.Tensor   # [B, G] stored teacher scores (nan where unknown)
    mined: torch.Tensor     # [B, G] bool: True for the positive and mined negatives
    filled: int             # negatives borrowed from other rows (a row had fewer than n)


def select_groups(rows: dict[str, list], num_negatives: int) -> Groups:
    """Each row's positive and its first `num_negatives` mined negatives (the mining job already
    orders them: random by default). A row with fewer negatives is filled with other rows'
    positives (random in-batch negatives), which have no teacher score. Deterministic. Prepared
    rows (query_ids, positive_ids, negatives_ids) give the same groups of token id rows."""
    if "positive_ids" in rows:
        rows = {**rows, "query": rows["query_ids"], "positive": rows["positive_ids"],
                "negatives": rows["negatives_ids"]}
    missing = [c for c in REQUIRED if c not in rows]
    if missing:
        raise ValueError(f"finetuning rows need columns {list(REQUIRED)}; missing {missing} "
                         f"(got {sorted(rows)}); is this the mining job's output?")
    n = num_negatives
    b = len(rows["query"])
    pos_scores = rows.get("positive_score")
    neg_scores = rows.get("negative_scores")
    docs: list[str] = []
    teacher = torch.full((b, n + 1), float("nan"))
    mined = torch.zeros(b, n + 1, dtype=torch.bool)
    filled = 0
    for i in range(b):
        negs = list(rows["negatives"][i] or [])[:n]
        scores = list(neg_scores[i] or [])[:n] if neg_scores is not None else []
        if len(negs) < n:
            others = [rows["positive"][(i + k) % b] for k in range(1, b)]
            if len(negs) + len(others) < n:
                raise ValueError(f"row {i} has {len(negs)} negatives and the batch too few other "
                                 f"rows to fill {n}; lower num_negatives or raise the batch size")
            filled += n - len(negs)
            extra = others[: n - len(negs)]
        else:
            extra = []
        docs.extend([rows["positive"][i], *negs, *extra])
        mined[i, : 1 + len(negs)] = True
        if pos_scores is not None and pos_scores[i] is not None:
            teacher[i, 0] = float(pos_scores[i])
        for j, s in enumerate(scores[: len(negs)]):
            if s is not None:
                teacher[i, 1 + j] = float(s)
    return Groups(docs, teacher, mined, filled)


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (token ids, masks): [b, ...] -> [W*b, ...]."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


@dataclass
class FinetuneObjective:
    """InfoNCE over positive + hard negatives (+ in-batch / cross-worker negatives), Matryoshka,
    teacher distillation; with mode=m3 the three BGE-M3 heads and self-knowledge distillation."""

    mode: Literal["dense", "m3"] = "dense"
    num_negatives: int = 10            # Arctic-Embed 2.0 App. C: 10; BGE-M3 App. B.1: 7
    temperature: float = 0.02          # Arctic App. C (the pretraining InfoNCE, reused)
    query_max_length: int = 512        # Arctic App. C: 512 for queries and documents
    document_max_length: int = 512
    negatives: Literal["hard", "in_batch", "cross_worker"] = "hard"  # Arctic: curated, not in-batch
    matryoshka_dims: list[int] = field(default_factory=list)        # Arctic §2.5: [256]
    matryoshka_weights: list[float] = field(default_factory=list)
    distill_weight: float = 0.0        # weight of KL to the teacher's softmax (0 = off)
    teacher_temperature: float = 0.02
    m3: M3Weights = field(default_factory=M3Weights)
    pad_across_workers: bool = False   # set by __post_init__ when per-token reps are gathered

    def begin_step(self, step: int) -> None:
        """The loop's 0-based optimizer step about to run (M3 warm-up switches self-KD on by it)."""
        self._step = step

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "m3"):
            raise ValueError(f"mode must be dense or m3, got {self.mode!r}")
        if self.negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {self.negatives!r}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.num_negatives == 0 and self.negatives == "hard":
            raise ValueError("num_negatives=0 with negatives=hard leaves no negatives")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("temperatures must be > 0")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(f"{len(self.matryoshka_dims)} matryoshka_dims but "
                             f"{len(self.matryoshka_weights)} matryoshka_weights")
        self._step: int | None = None  # not a config key: the loop's step (begin_step)
        if self.mode == "m3" and self.negatives == "cross_worker":
            self.pad_across_workers = True  # sparse [b, L] and multi-vector [b, L-1, H] are gathered

    @property
    def group_size(self) -> int:
        return 1 + self.num_negatives

    # ------------------------------------------------------------------ protocol
    def features(self, model: Encoder, rows: dict[str, list]) -> dict[str, dict[str, torch.Tensor]]:
        """Queries (query prefix) and the flattened groups (document prefix), each side padded once
        by pad_tokens (prepared rows: their token ids; text rows: tokenized here)."""
        groups = select_groups(rows, self.num_negatives)
        docs = groups.documents
        if "positive_ids" not in rows:
            docs = model.tokenize(docs, "document", self.document_max_length, padding=False)["input_ids"]
        return {"query": pad_tokens(model, side_ids(model, rows, "query", "query", self.query_max_length)),
                "document": pad_tokens(model, docs)}

    def embed(self, model: Any, side: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense [b, H]; in M3 mode also sparse token weights [b, L], multi-vectors [b, L-1, H'],
        and the mask and input_ids (integer: no gradient) that s_lex and s_mul need."""
        ids, mask = features["input_ids"], features["attention_mask"]
        if self.mode == "dense":
            return {"dense": model(ids, mask, dense=True)["dense"]}
        out = model(ids, mask, dense=True, sparse=True, multivector=True)
        return {"dense": out["dense"], "sparse": out["sparse"], "multivector": out["multivector"],
                "mask": mask, "input_ids": ids}

    def loss(self, reps: dict[str, dict[str, torch.Tensor]], features: dict[str, dict[str, torch.Tensor]],
             rows: dict[str, list]) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's mean loss over its queries (candidates gathered from all ranks if asked)."""
        q, d = reps["query"], reps["document"]
        b, g = q["dense"].shape[0], self.group_size
        if d["dense"].shape[0] != b * g:
            raise ValueError(f"{b} queries need {b * g} documents (groups of {g}), got {d['dense'].shape[0]}")
        groups = select_groups(rows, self.num_negatives)
        in_batch = self.negatives != "hard"
        offset = 0
        if self.negatives == "cross_worker":
            d = {k: (all_gather_with_grad(v) if v.is_floating_point() else _gather_no_grad(v))
                 for k, v in d.items()}
            offset = all_gather_offset(b)
        metrics: dict[str, float] = {"filled_negatives": float(groups.filled)}
        q_dense = q["dense"].float()
        d_dense = d["dense"].float()

        def dense_pair_loss(qe: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
            return hard_negative_infonce(qe, de, g, self.temperature, in_batch, offset)[0]

        if self.mode == "dense":
            total, per_dim = matryoshka_loss(dense_pair_loss, [q_dense, d_dense], self.matryoshka_dims,
                                             self.matryoshka_weights or None)
            metrics.update({f"loss_dense@{k}": float(v.detach()) for k, v in per_dim.items()})
            student = {"dense": _own(q_dense, d_dense, g, offset)}
            lam = {"dense": 1.0}
        else:
            qm = {**q, "dense": q_dense}
            dm = {**d, "dense": d_dense}
            scores = m3_head_scores(qm, dm, g, in_batch, offset)
            targets = group_targets(b, g, offset, in_batch, q_dense.device)
            total, parts = m3_self_distill_loss(scores["dense"], scores["lex"], scores["mul"], targets,
                                                self.temperature, self.m3, self._step)
            metrics.update({k: float(v) for k, v in parts.items()})
            metrics["self_distill"] = float("self_distill_dense" in parts)
            for dim, w in zip(self.matryoshka_dims, self.matryoshka_weights or [1.0] * len(self.matryoshka_dims)):
                _, extra = matryoshka_loss(dense_pair_loss, [q_dense, d_dense], [dim])
                total = total + w * extra[dim]
                metrics[f"loss_dense@{dim}"] = float(extra[dim].detach())
            student = {k: (own_group_scores(v, g, offset) if in_batch else v) for k, v in scores.items()}
            lam = {"dense": self.m3.lambda_dense, "lex": self.m3.lambda_lex, "mul": self.m3.lambda_mul}
        if self.distill_weight > 0:
            teacher = groups.teacher.to(q_dense.device)
            known = groups.mined.to(q_dense.device) & ~torch.isnan(teacher)
            if not known[:, 0].all():
                raise ValueError("distill_weight > 0 needs positive_score and negative_scores "
                                 "(the mining job's teacher scores) in every row")
            teacher = torch.nan_to_num(teacher, nan=0.0)
            kd = {k: teacher_kl(student[k], teacher, self.temperature, self.teacher_temperature, known)
                  for k in student}
            kd_total = sum(lam[k] * kd[k] for k in kd) / sum(lam.values())
            total = total + self.distill_weight * kd_total
            metrics.update({f"teacher_kl_{k}": float(v.detach()) for k, v in kd.items()})
        metrics["loss"] = float(total.detach())
        return total, metrics


def _own(q: torch.Tensor, d: torch.Tensor, group_size: int, offset: int) -> torch.Tensor:
    """Dense scores [B, G] of each query against its own group."""
    own = d.view(-1, group_size, d.shape[-1])[offset:offset + q.shape[0]]  # [B, G, D]
    return torch.einsum("bd,bgd->bg", q, own)


@dataclass
class LengthGroupingSection:
    """M3 §3.4 length grouping: bucket upper bounds in tokens (empty: off). A row's length is the
    longest of its documents; its source becomes `<source>#len<=<bound>`, so each global batch,
    split over the ranks, comes from one bucket. `batch_sizes` (one per bound, empty: all use
    data.global_batch_size) gives each bucket its own global batch size, as M3 does."""

    bounds: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_sizes and len(self.batch_sizes) != len(self.bounds):
            raise ValueError(f"length_grouping.batch_sizes {self.batch_sizes} needs one size per bound "
                             f"{self.bounds}")

    def source_batch_sizes(self) -> dict[str, int]:
        """{source key ending: global batch size} for data.source_batch_sizes."""
        return {f"#len<={b}": int(n) for b, n in zip(self.bounds, self.batch_sizes)}


