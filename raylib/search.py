"""Exact top-k inner-product search with FAISS: a GPU index when one is present, CPU otherwise.

Index storage is fp32, or fp16 where asked (GPU: `GpuIndexFlatConfig.useFloat16`; CPU:
`IndexScalarQuantizer(QT_fp16)`): an fp16 index only proposes candidates, their exact scores are
recomputed by the caller from fp32 vectors (raylib.mining.KeyedIndex).

Where this FAISS has no GPU (or no FAISS is installed) but torch sees CUDA, `exact_search` runs
on the GPU with `raylib.torch_search.TorchFlatIP` (fp16 storage, fp32 recheck: exact results).
"""

from __future__ import annotations

import numpy as np

INDEX_DTYPES = ("fp32", "fp16")
GPU_ADD_CHUNK = 262_144  # rows per GPU add: an fp16 add stages its rows in fp32 on the device
GPU_MAX_K = 1024  # FAISS GPU k-selection limit (2048 in recent builds; 1024 is safe for all)


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU (no torch import: it costs memory)."""
    try:
        import faiss
    except ImportError:  # a GPU host without FAISS: the torch search serves it (search_backend)
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


SEARCH_BACKENDS = ("faiss", "faiss-gpu", "torch")


def search_backend(use_gpu: bool | None = None, backend: str | None = None) -> str:
    """Which exact search runs: "faiss-gpu" (a GPU FAISS build and a GPU), "torch" (CUDA seen by
    torch but no GPU FAISS), else "faiss" (CPU). use_gpu False forces FAISS on the CPU; `backend`
    names one outright ("torch" on a CPU-only host runs the same code on the CPU)."""
    from raylib.torch_search import cuda_present

    if backend is not None:
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"search backend {backend!r} is not one of {SEARCH_BACKENDS}")
        return backend
    if use_gpu is False:
        return "faiss"
    if gpu_available():
        return "faiss-gpu"
    return "torch" if cuda_present() else "faiss"


def _resolve_gpu(use_gpu: bool | None) -> bool:
    """use_gpu None: auto-detect; True without a GPU build or device: fall back on the CPU."""
    return gpu_available() if use_gpu is None else bool(use_gpu) and gpu_available()


def gpu_flat_index(dim: int, dtype: str = "fp32", device: int = 0, reserve: int = 0):
    """An empty exact-IP GPU index (fp16 storage when dtype is fp16), with room for `reserve` rows
    reserved up front so adding in chunks never reallocates (which would briefly need 2x)."""
    import faiss

    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = device
    cfg.useFloat16 = dtype == "fp16"
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, dim, cfg)
    index.referenced_objects = [res]  # the resources must outlive the index
    if reserve and hasattr(index, "reserveMemory"):
        index.reserveMemory(reserve)
    return index


def cpu_index(dim: int, dtype: str = "fp32"):
    """An empty exact-IP CPU index: flat fp32, or fp16 codes (IndexScalarQuantizer QT_fp16)."""
    import faiss

    if dtype == "fp16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(dim)


def flat_ip_index(vectors: np.ndarray, use_gpu: bool | None = None, dtype: str = "fp32",
                  add_chunk: int = GPU_ADD_CHUNK):
    """An exact inner-product index over `vectors` [n, d] (float32): GPU if asked or auto-detected
    and this FAISS build has one (else CPU), storage fp32 or fp16; rows added in chunks."""
    if dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype {dtype!r} is not one of {INDEX_DTYPES}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if _resolve_gpu(use_gpu):
        index = gpu_flat_index(vectors.shape[1], dtype, reserve=len(vectors))
        for start in range(0, len(vectors), add_chunk):
            index.add(vectors[start:start + add_chunk])
        return index
    index = cpu_index(vectors.shape[1], dtype)
    if dtype == "fp16":
        index.train(vectors[:1])  # QT_fp16 needs no statistics, but FAISS wants a train call
    index.add(vectors)
    return index


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int, use_gpu: bool | None = None,
                 query_chunk: int = 4096, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k docs by inner product for each query: (scores [nq, k], ids [nq, k]), best first.

    k is capped at the number of documents. Queries go in chunks so memory stays bounded. On the
    CPU no index is built (`faiss.knn` reads `docs` in place: no second copy of the documents);
    it runs the same kernel as IndexFlatIP.search, so results are identical. `search_backend`
    picks FAISS (GPU or CPU) or the torch search (CUDA without GPU FAISS, or backend="torch").
    """
    if len(docs) == 0:
        raise ValueError("cannot search an empty document set")
    k = min(k, len(docs))
    docs = np.ascontiguousarray(docs, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    which = search_backend(use_gpu, backend)
    if which == "torch":
        from raylib.torch_search import TorchFlatIP, cuda_present

        index = TorchFlatIP(docs, device="cuda" if cuda_present() else "cpu", storage="fp16",
                            query_chunk=max(query_chunk, 8192))
        return index.search(queries, k)
    import faiss

    if which == "faiss-gpu":
        index = flat_ip_index(docs, True)
        search = lambda x: index.search(x, k)  # noqa: E731
    else:
        search = lambda x: faiss.knn(x, docs, k, metric=faiss.METRIC_INNER_PRODUCT)  # noqa: E731
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), query_chunk):
        s, i = search(queries[start:start + query_chunk])
        scores[start:start + len(s)], ids[start:start + len(i)] = s, i
    return scores, ids
