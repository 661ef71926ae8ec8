"""Retrieval metrics with trec_eval's definitions (as pytrec_eval computes them).

qrels: {qid: {docid: int grade}}, run: {qid: {docid: score}}. Like trec_eval without -c, a query
counts when it is in both the run and the qrels; means are over those queries. Ties in the run are
broken by docid, descending (trec_eval's order). Gains are the grades themselves (linear nDCG),
a document is relevant when its grade >= 1.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def ranked(docs: Mapping[str, float]) -> list[str]:
    """Doc ids by score descending, ties by docid descending (trec_eval)."""
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def ndcg_at(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    num_rel = sum(1 for g in rels.values() if g >= 1)
    hits = sum(1 for d in ranking[:k] if rels.get(d, 0) >= 1)
    return hits / num_rel if num_rel else 0.0


def mrr_at(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def precision_at(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    return sum(1 for d in ranking[:k] if rels.get(d, 0) >= 1) / k


METRICS = {"ndcg": ndcg_at, "recall": recall_at, "mrr": mrr_at, "precision": precision_at}


def _parse(name: str) -> tuple[str, int]:
    base, _, cut = name.partition("@")
    if base not in METRICS or not cut.isdigit():
        raise ValueError(f"unknown metric {name!r}; use one of {sorted(METRICS)} with @k, e.g. ndcg@10")
    return base, int(cut)


def per_query(qrels: Qrels, run: Run, metrics: Iterable[str] = ("ndcg@10", "recall@100", "mrr@10"),
              ) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} for every query in both run and qrels."""
    parsed = {m: _parse(m) for m in metrics}
    out = {}
    for qid, docs in run.items():
        if qid not in qrels:
            continue
        ranking = ranked(docs)
        out[qid] = {m: METRICS[b](ranking, qrels[qid], k) for m, (b, k) in parsed.items()}
    return out


def evaluate(qrels: Qrels, run: Run, metrics: Iterable[str] = ("ndcg@10", "recall@100", "mrr@10"),
             ) -> dict[str, float]:
    """Mean of each metric over the evaluated queries."""
    metrics = tuple(metrics)
    scores = per_query(qrels, run, metrics)
    if not scores:
        raise ValueError("no query of the run is in the qrels")
    return {m: sum(s[m] for s in scores.values()) / len(scores) for m in metrics}
