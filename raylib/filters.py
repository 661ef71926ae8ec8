"""Pair curation logic (no Ray): heuristic filters (Arctic-Embed 1.0 style) and the top-k
consistency filter of Arctic-Embed 2.0 (section 2.3, appendix B).

Every function here is pure NumPy/FAISS so it can be unit-tested and used in a notebook; the Ray
Data glue lives in raylib/ray_data/consistency.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Names of the heuristic filters, in the order they are checked (a pair is counted under the
# first one it fails, so the per-filter counts add up to the pairs dropped).
HEURISTICS = ("query_length", "document_length", "query_equals_document", "non_text", "duplicate")


@dataclass
class HeuristicConfig:
    """Bounds and switches of the heuristic filters (each can be turned off)."""

    length: bool = True  # query/document character-length bounds
    query_min_chars: int = 3
    query_max_chars: int = 2000
    document_min_chars: int = 10
    document_max_chars: int = 50_000
    query_equals_document: bool = True  # drop pairs whose query equals the document (normalized)
    non_text: bool = True  # drop documents that are mostly not letters (tables, code, ids, urls)
    min_letter_ratio: float = 0.5  # letters / non-space characters below this = non-text
    duplicate: bool = True  # drop exact duplicate (query, document) pairs within a dataset

    def __post_init__(self) -> None:
        for name in ("query_min_chars", "query_max_chars", "document_min_chars", "document_max_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"heuristics.{name} must be >= 0, got {getattr(self, name)}")
        if self.query_min_chars > self.query_max_chars:
            raise ValueError("heuristics.query_min_chars > heuristics.query_max_chars")
        if self.document_min_chars > self.document_max_chars:
            raise ValueError("heuristics.document_min_chars > heuristics.document_max_chars")
        if not 0.0 <= self.min_letter_ratio <= 1.0:
            raise ValueError(f"heuristics.min_letter_ratio must be in [0, 1], got {self.min_letter_ratio}")


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, case-folded text (for the query == document check)."""
    return " ".join(text.split()).casefold()


def letter_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are letters (any script); 0 for empty text."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() for c in chars) / len(chars)


def heuristic_reason(query: str, document: str, cfg: HeuristicConfig) -> str | None:
    """The first row-level heuristic the pair fails (a name from HEURISTICS), or None."""
    if cfg.length:
        if not cfg.query_min_chars <= len(query.strip()) <= cfg.query_max_chars:
            return "query_length"
        if not cfg.document_min_chars <= len(document.strip()) <= cfg.document_max_chars:
            return "document_length"
    if cfg.query_equals_document and normalize_text(query) == normalize_text(document):
        return "query_equals_document"
    if cfg.non_text and letter_ratio(document) < cfg.min_letter_ratio:
        return "non_text"
    return None


def heuristic_reasons(queries: Sequence[str], documents: Sequence[str],
                      cfg: HeuristicConfig) -> list[str | None]:
    """`heuristic_reason` for each pair (duplicates are found per shard: `duplicate_mask`)."""
    return [heuristic_reason(q, d, cfg) for q, d in zip(queries, documents)]


def duplicate_mask(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """bool [n]: True for the second and later occurrences of an exact (query, document) pair."""
    seen: set[tuple[str, str]] = set()
    out = np.zeros(len(queries), dtype=bool)
    for i, pair in enumerate(zip(queries, documents)):
        if pair in seen:
            out[i] = True
        else:
            seen.add(pair)
    return out


def pair_hash(query: str, document: str) -> int:
    """A stable 63-bit hash of the exact pair (same in every process, unlike hash())."""
    h = hashlib.blake2b(query.encode("utf-8"), digest_size=8)
    h.update(b"\x00")
    h.update(document.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


def num_consistency_shards(num_pairs: int, shard_size: int) -> int:
    """Even cuts of at most about `shard_size` pairs: ceil(n / shard_size), at least 1."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return max(1, math.ceil(num_pairs / shard_size))


def shard_ids(queries: Sequence[str], documents: Sequence[str], shards: int) -> np.ndarray:
    """int64 [n]: shard of each pair = pair_hash mod shards (exact duplicates share a shard)."""
    return np.array([pair_hash(q, d) % shards for q, d in zip(queries, documents)], dtype=np.int64)


def document_keys(documents: Sequence[Any]) -> np.ndarray:
    """int64 [n]: the same key for identical document texts (index of their first occurrence)."""
    first: dict[Any, int] = {}
    return np.array([first.setdefault(d, i) for i, d in enumerate(documents)], dtype=np.int64)


# Host bytes per pair that `consistency_ranks` needs on top of its fp32 inputs (query + document,
# 8 d bytes): a contiguous copy of the distinct documents when some texts repeat (4 d), the
# candidate ids and FAISS scores (12 k), keys/inverse/ranks (~64); the float64 recheck works on
# chunks of at most RECHECK_CHUNK_BYTES. At d = 384, k = 20: <= 1,840 B on top of 3,072 B of inputs.
RECHECK_CHUNK_BYTES = 64 << 20


def ranking_bytes_per_pair(dim: int, top_k: int, duplicates: bool = True) -> int:
    """Upper bound of the host bytes per pair of one shard's ranking, inputs included."""
    return 8 * dim + (4 * dim if duplicates else 0) + 12 * top_k + 64


def consistency_ranks(q_emb: np.ndarray, d_emb: np.ndarray, doc_keys: Sequence[Any], top_k: int,
                      use_gpu: bool | None = None, chunk_bytes: int = RECHECK_CHUNK_BYTES,
                      backend: str | None = None) -> np.ndarray:
    """consistency_rank of each pair within one shard: 1 + the number of distinct documents of
    the shard that score strictly higher than the pair's own document for its query.

    q_emb [n, d], d_emb [n, d] (row i = pair i), doc_keys [n] (equal keys = identical document
    texts: one document). Returns int64 [n] in 1..top_k, or top_k + 1 meaning "beyond top_k".
    Candidates come from exact FAISS inner-product search over the distinct documents (GPU index
    when present, else the torch search on CUDA: `raylib.search.search_backend`, which `backend`
    overrides); their scores and the own-document score are then recomputed in float64 so
    the comparison is exact and tie-consistent (ties do not push a document down). The recheck
    runs over chunks of queries of at most `chunk_bytes`: memory stays linear in n
    (`ranking_bytes_per_pair`), never [n, k, d].
    """
    from raylib.search import exact_search

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    q_emb = np.ascontiguousarray(q_emb, dtype=np.float32)
    d_emb = np.ascontiguousarray(d_emb, dtype=np.float32)
    n = len(q_emb)
    if d_emb.shape != q_emb.shape or len(doc_keys) != n:
        raise ValueError(f"shape mismatch: q {q_emb.shape}, d {d_emb.shape}, keys {len(doc_keys)}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, own = np.unique(np.asarray(doc_keys), return_index=True, return_inverse=True)
    own = own.reshape(-1)
    # [m, d] distinct documents; no copy when every text is distinct and keys follow row order
    docs = d_emb if len(first) == n and (first == np.arange(n)).all() else d_emb[first]
    k = min(top_k, len(docs))
    _, cand = exact_search(q_emb, docs, k, use_gpu=use_gpu, backend=backend)  # [n, k]
    greater = _count_higher(q_emb, docs, cand, own, chunk_bytes)
    return np.where(greater < top_k, greater + 1, top_k + 1).astype(np.int64)


def _count_higher(q_emb: np.ndarray, docs: np.ndarray, cand: np.ndarray, own: np.ndarray,
                  chunk_bytes: int) -> np.ndarray:
    """Per query: candidates other than its own document scoring strictly higher in float64
    (the same einsum per row as an unchunked recheck, so bit-identical scores)."""
    n, k = cand.shape
    dim = q_emb.shape[1]
    rows = max(1, chunk_bytes // (12 * dim * (k + 2)))  # fp32 gather + float64 copy per row
    greater = np.empty(n, dtype=np.int64)
    for s in range(0, n, rows):
        c_cand, c_own = cand[s:s + rows], own[s:s + rows]
        q64 = q_emb[s:s + rows].astype(np.float64)
        own_score = np.einsum("nd,nd->n", q64, docs[c_own].astype(np.float64))  # [c]
        cand_score = np.einsum("nd,nkd->nk", q64, docs[c_cand].astype(np.float64))  # [c, k]
        higher = (cand_score > own_score[:, None]) & (c_cand != c_own[:, None])
        greater[s:s + rows] = higher.sum(1)
    return greater
