"""Relevance scores of BGE-M3 (M3 §3.2): dense, lexical (s_lex), late interaction (s_mul), hybrid.

Every function scores many queries x many documents at once; one query is the n_q = 1 case.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch

SparseVec = Mapping[int, float]

# FlagEmbedding's BGEM3FlagModel.compute_score default weights for (dense, sparse, colbert).
DEFAULT_WEIGHTS = (0.4, 0.2, 0.4)


def dense_scores(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[nq, dim] x [nd, dim] -> [nq, nd] inner products (cosine for normalized vectors)."""
    return np.asarray(q, dtype=np.float32) @ np.asarray(d, dtype=np.float32).T


def sparse_matrix(vecs: Sequence[SparseVec], vocab_size: int | None = None) -> sp.csr_matrix:
    """List of {token_id: weight} -> CSR [n, vocab]."""
    rows, cols, vals = [], [], []
    for i, vec in enumerate(vecs):
        for token, weight in vec.items():
            rows.append(i)
            cols.append(int(token))
            vals.append(float(weight))
    width = vocab_size or (max(cols) + 1 if cols else 1)
    return sp.csr_matrix((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(len(vecs), width))


def lexical_scores(q: Sequence[SparseVec], d: Sequence[SparseVec]) -> np.ndarray:
    """s_lex = sum over tokens in both of w_q(t) * w_d(t); [nq, nd]."""
    width = 1 + max([int(t) for vec in (*q, *d) for t in vec] or [0])
    return np.asarray((sparse_matrix(q, width) @ sparse_matrix(d, width).T).todense(), dtype=np.float32)


def _pad(vecs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of [len_i, dim] -> padded [n, max_len, dim] and mask [n, max_len]."""
    longest = max(len(v) for v in vecs)
    dim = vecs[0].shape[1]
    out = torch.zeros(len(vecs), longest, dim)
    mask = torch.zeros(len(vecs), longest, dtype=torch.bool)
    for i, v in enumerate(vecs):
        out[i, : len(v)] = torch.as_tensor(np.asarray(v, dtype=np.float32))
        mask[i, : len(v)] = True
    return out, mask


def multivector_scores(q: Sequence[np.ndarray], d: Sequence[np.ndarray], doc_chunk: int = 256) -> np.ndarray:
    """s_mul = mean over query tokens of the max dot product over document tokens; [nq, nd]."""
    qv, qm = _pad(q)  # [nq, Lq, dim], [nq, Lq]
    out = np.empty((len(q), len(d)), dtype=np.float32)
    for start in range(0, len(d), doc_chunk):
        dv, dm = _pad(d[start:start + doc_chunk])  # [nc, Ld, dim]
        sim = torch.einsum("qid,cjd->qcij", qv, dv)  # [nq, nc, Lq, Ld]
        sim = sim.masked_fill(~dm[None, :, None, :], float("-inf"))
        best = sim.max(-1).values.masked_fill(~qm[:, None, :], 0.0)  # [nq, nc, Lq]
        out[:, start:start + len(dv)] = (best.sum(-1) / qm.sum(-1, keepdim=True)).numpy()
    return out


def hybrid_scores(dense: np.ndarray | None = None, sparse: np.ndarray | None = None,
                  multivector: np.ndarray | None = None,
                  weights: Sequence[float] = DEFAULT_WEIGHTS) -> np.ndarray:
    """Weighted mean of the available scores: sum_k w_k s_k / sum_k w_k (FlagEmbedding's fusion)."""
    parts = [(w, s) for w, s in zip(weights, (dense, sparse, multivector)) if s is not None and w != 0]
    if not parts:
        raise ValueError("hybrid_scores needs at least one score matrix with a non-zero weight")
    total = sum(w for w, _ in parts)
    return sum(w * np.asarray(s, dtype=np.float32) for w, s in parts) / total


def score_encoded(q: dict, d: dict, weights: Sequence[float] = DEFAULT_WEIGHTS) -> dict[str, np.ndarray]:
    """All scores for two `Encoder.encode` outputs; keys: dense, sparse, multivector, hybrid."""
    out: dict[str, np.ndarray] = {}
    if "dense" in q and "dense" in d:
        out["dense"] = dense_scores(q["dense"], d["dense"])
    if "sparse" in q and "sparse" in d:
        out["sparse"] = lexical_scores(q["sparse"], d["sparse"])
    if "multivector" in q and "multivector" in d:
        out["multivector"] = multivector_scores(q["multivector"], d["multivector"])
    out["hybrid"] = hybrid_scores(out.get("dense"), out.get("sparse"), out.get("multivector"), weights)
    return out


def compute_score(encoder, pairs: Sequence[tuple[str, str]], weights: Sequence[float] = DEFAULT_WEIGHTS,
                  max_length: int | None = None) -> dict[str, np.ndarray]:
    """Score (query, passage) pairs with every head the encoder has, like BGEM3FlagModel.compute_score.

    Keys: dense, sparse, multivector (per head), sparse+dense, hybrid (all heads), each [n_pairs].
    Texts are encoded with the model's query / document prefixes.
    """
    if not pairs:
        raise ValueError("pairs is empty")
    kw = dict(dense=True, sparse=encoder.has_sparse, multivector=encoder.has_multivector,
              max_length=max_length)
    q = encoder.encode([p[0] for p in pairs], kind="query", **kw)
    d = encoder.encode([p[1] for p in pairs], kind="document", **kw)
    out = {"dense": np.einsum("nd,nd->n", q["dense"], d["dense"])}
    if encoder.has_sparse:
        out["sparse"] = np.array([lexical_scores([a], [b])[0, 0] for a, b in zip(q["sparse"], d["sparse"])])
        out["sparse+dense"] = hybrid_scores(out["dense"], out["sparse"], None, weights)
    if encoder.has_multivector:
        out["multivector"] = np.array([multivector_scores([a], [b])[0, 0]
                                       for a, b in zip(q["multivector"], d["multivector"])])
    out["hybrid"] = hybrid_scores(out["dense"], out.get("sparse"), out.get("multivector"), weights)
    return out
