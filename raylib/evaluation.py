"""Retrieval evaluation of an Encoder on a BEIR data set: dense / sparse / multi-vector / hybrid,
Matryoshka dims and quantized embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raylib.beir import BeirData
from raylib.metrics import evaluate
from raylib.encoding import truncate_dims
from raylib.model import Encoder
from raylib.quantization import quantized_search
from raylib.scoring import DEFAULT_WEIGHTS, hybrid_scores, lexical_scores, multivector_scores
from raylib.search import exact_search

MODES = ("dense", "sparse", "multivector", "hybrid")


def _run(qids: list[str], dids: list[str], scores: np.ndarray, ids: np.ndarray) -> dict:
    return {q: {dids[j]: float(s) for s, j in zip(scores[i], ids[i])} for i, q in enumerate(qids)}


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, scores.shape[1])
    ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def evaluate_scores(scores: np.ndarray, qids: list[str], dids: list[str], qrels: dict,
                    metrics: Sequence[str] = ("ndcg@10",), k: int = 100) -> dict[str, float]:
    """Metrics of a full [num_queries, num_docs] score matrix (every document scored), ranked to
    the top `k`: the step every sparse, multi-vector and hybrid result goes through, and what a
    hybrid weight search calls once per weight triple on head scores computed once."""
    s, i = _topk(scores, k)
    return evaluate(qrels, _run(qids, dids, s, i), metrics)


def encode_all(encoder: Encoder, texts: list[str], kind: str, **kwargs) -> dict:
    """`Encoder.encode`, but empty and whitespace-only texts are encoded too (the model sees only
    its prefix and special tokens), as sentence-transformers and so MTEB do: a corpus holding
    empty documents scores as it does for the peers (`Encoder.encode` refuses them, as input
    errors of a caller)."""
    full = [i for i, t in enumerate(texts) if t.strip()]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    ids: list = [None] * len(texts)
    if full:
        tokens = encoder.tokenize([texts[i] for i in full], kind, None, padding=False)["input_ids"]
        for i, row in zip(full, tokens):
            ids[i] = row
    if empty:  # Encoder.tokenize refuses these: the tokenizer call it makes, for them alone
        prefix = encoder.settings.query_prefix if kind == "query" else encoder.settings.document_prefix
        tokens = encoder.tokenizer([prefix + texts[i] for i in empty], truncation=True,
                                   max_length=encoder.settings.max_length)["input_ids"]
        for i, row in zip(empty, tokens):
            ids[i] = row
    return encoder.encode_features(ids, desc=f"encode ({kind})", **kwargs)


def evaluate_encoder(encoder: Encoder, data: BeirData, modes: Sequence[str] = ("dense",),
                     dims: Sequence[int] = (), quantization: Sequence[str] = ("none",),
                     metrics: Sequence[str] = ("ndcg@10", "recall@100", "mrr@10"), k: int = 100,
                     batch_size: int = 64, weights: Sequence[float] = DEFAULT_WEIGHTS,
                     show_progress: bool = False, mcls: int | None = None) -> dict[str, dict[str, float]]:
    """Results keyed `dense`, `dense@128`, `dense/int8`, `dense@128/binary`, `sparse`, ...

    Dense runs use exact FAISS search; sparse, multi-vector and hybrid score every document
    (fine for BEIR-sized corpora, which is what this evaluates). `mcls=N` encodes queries and
    documents with MCLS (M3 App. B.2, Encoder.encode; dense modes only). Empty or whitespace-only
    queries and documents are encoded like any other text (`encode_all`); `data.empty_counts()`
    says how many there were.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    need_sparse = any(m in ("sparse", "hybrid") for m in modes)
    need_multi = any(m in ("multivector", "hybrid") for m in modes)
    qids, dids = list(data.queries), data.doc_ids()
    kw = dict(dense=True, sparse=need_sparse, multivector=need_multi, batch_size=batch_size,
              show_progress=show_progress)
    if mcls:
        if need_sparse or need_multi:
            raise ValueError("mcls applies to the dense head only: evaluate modes=[dense] with it")
        kw["mcls"] = mcls
    q = encode_all(encoder, [data.queries[i] for i in qids], "query", **kw)
    d = encode_all(encoder, data.doc_texts(), "document", **kw)
    return evaluate_encoded(q, d, qids, dids, data.qrels, modes, dims, quantization, metrics, k, weights)


def evaluate_encoded(q: dict, d: dict, qids: list[str], dids: list[str], qrels: dict,
                     modes: Sequence[str] = ("dense",), dims: Sequence[int] = (),
                     quantization: Sequence[str] = ("none",),
                     metrics: Sequence[str] = ("ndcg@10", "recall@100", "mrr@10"), k: int = 100,
                     weights: Sequence[float] = DEFAULT_WEIGHTS) -> dict[str, dict[str, float]]:
    """The scoring half of `evaluate_encoder`: encoded queries and documents (Encoder.encode's
    outputs, in qids / dids order) -> results per mode, dim and quantization."""
    results: dict[str, dict[str, float]] = {}
    if "dense" in modes:
        for dim in [None, *dims]:
            qd = truncate_dims(q["dense"], dim) if dim else q["dense"]
            dd = truncate_dims(d["dense"], dim) if dim else d["dense"]
            for method in quantization:
                key = "dense" + (f"@{dim}" if dim else "") + ("" if method == "none" else f"/{method}")
                if method == "none":
                    s, i = exact_search(qd, dd, k)
                else:
                    s, i = quantized_search(qd, dd, k, method)
                results[key] = evaluate(qrels, _run(qids, dids, s, i), metrics)
    full = {}
    if any(m in ("sparse", "hybrid") for m in modes):
        full["sparse"] = lexical_scores(q["sparse"], d["sparse"])
    if any(m in ("multivector", "hybrid") for m in modes):
        full["multivector"] = multivector_scores(q["multivector"], d["multivector"])
    if "hybrid" in modes:
        from raylib.scoring import dense_scores
        full["hybrid"] = hybrid_scores(dense_scores(q["dense"], d["dense"]), full.get("sparse"),
                                       full.get("multivector"), weights)
    for mode in ("sparse", "multivector", "hybrid"):
        if mode in modes:
            results[mode] = evaluate_scores(full[mode], qids, dids, qrels, metrics, k)
    return results
