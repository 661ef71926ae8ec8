"""Arctic-Embed 2.0 App. C contrastive pretraining objective: InfoNCE of queries against in-batch
documents gathered from every worker, with Matryoshka prefixes. Plain PyTorch, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raylib.losses.gather import all_gather_offset, all_gather_with_grad
from raylib.losses.infonce import info_nce
from raylib.losses.matryoshka import matryoshka_loss
from raylib.model import Encoder
from raylib.objectives.base import Features, Reps, pad_tokens, side_ids


@dataclass
class ContrastiveObjective:
    """Arctic-Embed 2.0 App. C contrastive pretraining: InfoNCE (tau 0.02) of each query against all
    in-batch documents gathered from every worker; optional symmetric document->query direction;
    Matryoshka (§2.5) on truncated prefixes."""

    temperature: float = 0.02
    query_max_length: int = 32
    document_max_length: int = 256
    gather_documents: bool = True
    gather_queries: bool = False  # candidates of the document->query direction come from all workers
    symmetric: bool = False
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)
    full_weight: float = 1.0
    pad_across_workers: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(f"{len(self.matryoshka_dims)} matryoshka_dims but "
                             f"{len(self.matryoshka_weights)} matryoshka_weights")

    def features(self, model: Encoder, rows: dict[str, list]) -> Features:
        """Queries (query prefix, query_max_length) and documents (document_max_length): token ids of
        prepared rows or tokenized texts, each side padded by pad_tokens."""
        return {"query": pad_tokens(model, side_ids(model, rows, "query", "query", self.query_max_length)),
                "document": pad_tokens(model, side_ids(model, rows, "document", "document",
                                                       self.document_max_length))}

    def embed(self, model: Any, side: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense embeddings [b, H] of one chunk of one side."""
        out = model(features["input_ids"], features["attention_mask"], dense=True)
        return {"dense": out["dense"]}

    def loss(self, reps: Reps, features: Features, rows: dict[str, list]) -> tuple[torch.Tensor, dict[str, float]]:
        """InfoNCE (+ Matryoshka prefixes) of local queries vs gathered documents; metrics per dim."""
        q = reps["query"]["dense"].float()      # [b, H]
        d = reps["document"]["dense"].float()   # [b, H]
        if q.shape[0] != d.shape[0]:
            raise ValueError(f"{q.shape[0]} queries but {d.shape[0]} documents: pairs expected")
        b = q.shape[0]
        local = torch.arange(b, device=q.device)
        d_all = all_gather_with_grad(d) if self.gather_documents else d            # [W*b, H] or [b, H]
        d_pos = local + (all_gather_offset(b) if self.gather_documents else 0)
        embeddings = [q, d_all]
        if self.symmetric:
            q_all = all_gather_with_grad(q) if self.gather_queries else q
            q_pos = local + (all_gather_offset(b) if self.gather_queries else 0)
            embeddings += [d, q_all]

        def pair_loss(*e: torch.Tensor) -> torch.Tensor:
            forward = info_nce(e[0], e[1], d_pos, self.temperature)
            if not self.symmetric:
                return forward
            return 0.5 * (forward + info_nce(e[2], e[3], q_pos, self.temperature))

        total, per_dim = matryoshka_loss(pair_loss, embeddings, self.matryoshka_dims,
                                         self.matryoshka_weights or None, self.full_weight)
        metrics = {"loss": float(total.detach())}
        metrics.update({f"loss@{dim}": float(v.detach()) for dim, v in per_dim.items()})
        return total, metrics
