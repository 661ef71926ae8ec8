"""Retrieval evaluation during training (sentence-transformers' InformationRetrievalEvaluator, the
platform's way): an eval set of token ids, scored by raylib.evaluation's one code path
(`evaluate_encoded`, trec_eval metrics of raylib.metrics). No Ray.

The set is either a BEIR dir (texts, tokenized here with the model's prefixes) or held-out rows of
the prepared training data (token ids as the Train workers read them): each held-out query must
find its own positive among all held-out positives (+ their mined negatives).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from raylib.beir import BeirData
from raylib.evaluation import encode_all, evaluate_encoded
from raylib.model import Encoder

EVAL_METRICS = ("ndcg@10", "recall@100")


@dataclass
class EvalSet:
    """Queries and documents as token id rows, with qrels."""

    qids: list[str]
    query_ids: list | None           # token id rows (None: tokenize `query_texts`)
    dids: list[str]
    document_ids: list | None
    qrels: dict[str, dict[str, int]]
    query_texts: list[str] | None = None
    document_texts: list[str] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {"queries": len(self.qids), "documents": len(self.dids)}


def beir_eval_set(data: BeirData, max_queries: int = 0) -> EvalSet:
    """A BEIR set (texts) as an EvalSet; `max_queries` keeps the first N queries (0: all)."""
    qids = list(data.queries)[: max_queries or None]
    return EvalSet(qids, None, data.doc_ids(), None, {q: data.qrels[q] for q in qids},
                   [data.queries[q] for q in qids], data.doc_texts())


def holdout_eval_set(rows: dict[str, list], max_queries: int = 0) -> EvalSet:
    """Held-out prepared rows (query_ids + document_ids, or positive_ids + negatives_ids) -> an
    EvalSet whose corpus is every held-out positive and negative (deduplicated by token ids)."""
    n = len(rows["query_ids"])
    positives = rows.get("document_ids", rows.get("positive_ids"))
    if positives is None:
        raise ValueError(f"held-out rows need document_ids or positive_ids, got {sorted(rows)}")
    negatives = rows.get("negatives_ids") or [[] for _ in range(n)]
    doc_index: dict[tuple, str] = {}
    documents: list = []

    def doc_id(ids) -> str:
        key = tuple(int(t) for t in ids)
        if key not in doc_index:
            doc_index[key] = f"d{len(doc_index)}"
            documents.append(list(key))
        return doc_index[key]

    qids, queries, qrels = [], [], {}
    for i in range(n if not max_queries else min(n, max_queries)):
        qid = f"q{i}"
        qids.append(qid)
        queries.append([int(t) for t in rows["query_ids"][i]])
        qrels[qid] = {doc_id(positives[i]): 1}
    for i in range(n):  # every held-out document is a candidate, also those of capped queries
        doc_id(positives[i])
        for neg in negatives[i] or []:
            doc_id(neg)
    return EvalSet(qids, queries, list(doc_index.values()), documents, qrels)


def eval_modes(encoder: Encoder, objective: Any, modes: Sequence[str] = ()) -> list[str]:
    """The heads to evaluate: as configured, else dense + the M3 heads when the objective trains them."""
    if modes:
        return list(modes)
    m3 = getattr(objective, "mode", "dense") == "m3" and encoder.has_sparse and encoder.has_multivector
    return ["dense", "sparse", "multivector"] if m3 else ["dense"]


def evaluate_during_training(encoder: Encoder, data: EvalSet, modes: Sequence[str],
                             metrics: Sequence[str] = EVAL_METRICS, batch_size: int = 64) -> dict[str, float]:
    """{"eval/<mode>/<metric>": value, "eval_s": seconds}; the encoder's train/eval mode is kept."""
    start = time.perf_counter()
    kw = dict(dense=True, sparse=any(m in ("sparse", "hybrid") for m in modes),
              multivector=any(m in ("multivector", "hybrid") for m in modes), batch_size=batch_size)
    q = _encode(encoder, data.query_ids, data.query_texts, "query", kw)
    d = _encode(encoder, data.document_ids, data.document_texts, "document", kw)
    k = max(100, *(int(m.partition("@")[2]) for m in metrics))
    results = evaluate_encoded(q, d, data.qids, data.dids, data.qrels, modes, metrics=metrics, k=k)
    out = {f"eval/{mode}/{m}": round(float(v), 6) for mode, values in results.items() for m, v in values.items()}
    out["eval_s"] = round(time.perf_counter() - start, 3)
    return out


def _encode(encoder: Encoder, ids: list | None, texts: list[str] | None, kind: str, kw: dict) -> dict:
    if ids is None:
        return encode_all(encoder, texts, kind, **kw)
    return encoder.encode_features([np.asarray(r) for r in ids], **kw)


def best_eval(rows: list[dict], attribute: str, order: str = "max") -> dict | None:
    """{"step", "score", "metric"} of the best evaluated step in metric rows (first on ties)."""
    scored = [r for r in rows if attribute in r]
    if not scored:
        return None
    sign = 1.0 if order == "max" else -1.0
    best = max(scored, key=lambda r: (sign * r[attribute], -r["step"]))
    return {"step": int(best["step"]), "score": float(best[attribute]), "metric": attribute}
