"""Exact top-k inner-product search with FAISS: a GPU index when one is present, CPU otherwise."""

from __future__ import annotations

import numpy as np


def gpu_available() -> bool:
    """True when both torch sees a GPU and this FAISS build has GPU support."""
    import faiss
    import torch

    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def flat_ip_index(vectors: np.ndarray, use_gpu: bool | None = None):
    """An exact inner-product index over `vectors` [n, d] (float32); GPU if asked or auto-detected."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(vectors)
    return index


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int, use_gpu: bool | None = None,
                 query_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k docs by inner product for each query: (scores [nq, k], ids [nq, k]), best first.

    k is capped at the number of documents. Queries go in chunks so memory stays bounded.
    """
    if len(docs) == 0:
        raise ValueError("cannot search an empty document set")
    k = min(k, len(docs))
    index = flat_ip_index(docs, use_gpu)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_chunk):
        s, i = index.search(queries[start:start + query_chunk], k)
        scores[start:start + len(s)], ids[start:start + len(i)] = s, i
    return scores, ids
