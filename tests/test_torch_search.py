"""The torch exact search (the GPU search where FAISS has no GPU), run on the CPU: equal to
FAISS's exact CPU search on ids and scores, ties by the smaller id, in every storage dtype."""

import faiss
import numpy as np
import pytest

import raylib.mining as M
from raylib.filters import consistency_ranks, document_keys
from raylib.search import exact_search, search_backend
from raylib.torch_search import TorchFlatIP, rel_error


def _data(n_docs=3000, n_q=300, dim=48, dups=200, seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    docs[-dups:] = docs[rng.integers(0, n_docs - dups, dups)]  # exact duplicates: tied scores
    q = docs[rng.integers(0, n_docs, n_q)] + 0.3 * rng.standard_normal((n_q, dim)).astype(np.float32)
    return q.astype(np.float32), docs


def _reference(q, docs, k):
    """Exact top-k: fp32 scores ordered by (score desc, id asc)."""
    s = q @ docs.T
    order = np.lexsort((np.broadcast_to(np.arange(len(docs)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def _assert_matches(scores, ids, f_scores, f_ids):
    """Scores equal to FAISS's (fp32 sums in another order: within 2e-6); ids equal wherever
    FAISS's order is not decided by a tie (the duplicated documents tie exactly)."""
    np.testing.assert_allclose(scores, f_scores, rtol=0, atol=2e-6)
    gaps = np.diff(-f_scores, axis=1, append=-np.inf) > 1e-5
    clear = gaps & np.concatenate([np.ones((len(gaps), 1), bool), gaps[:, :-1]], axis=1)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ids[clear], f_ids[clear])


@pytest.mark.parametrize("storage", ["fp32", "bf16", "fp16"])
def test_equals_faiss_cpu_exact_search(storage):
    q, docs = _data()
    k = 10
    index = TorchFlatIP(docs, device="cpu", storage=storage, tile_bytes=1 << 16, query_chunk=64)
    scores, ids = index.search(q, k)
    _assert_matches(scores, ids, *faiss.knn(q, docs, k, metric=faiss.METRIC_INNER_PRODUCT))
    # ties: the smaller id first, exactly the reference order
    r_scores, r_ids = _reference(q, docs, k)
    np.testing.assert_array_equal(ids, r_ids)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_uncertified_rows_are_rescanned_exactly():
    """bf16 candidates with no oversampling cannot certify near ties: the fp32 rescan must."""
    q, docs = _data(n_docs=1500, n_q=100, dim=32, dups=400, seed=1)
    k = 20
    index = TorchFlatIP(docs, device="cpu", storage="bf16", oversample=1.0, tile_bytes=1 << 14,
                        recheck_on_device=False)
    scores, ids = index.search(q, k)
    r_scores, r_ids = _reference(q, docs, k)
    np.testing.assert_array_equal(ids, r_ids)
    np.testing.assert_allclose(scores, r_scores, atol=2e-6)
    assert rel_error("bf16", 32) > rel_error("fp16", 32) > rel_error("fp32", 32)


def test_exact_search_torch_backend_equals_faiss_and_k_capped():
    q, docs = _data(n_docs=500, n_q=50, dim=16, dups=50, seed=2)
    t_s, t_i = exact_search(q, docs, 7, backend="torch")
    _assert_matches(t_s, t_i, *exact_search(q, docs, 7, use_gpu=False))
    np.testing.assert_array_equal(t_i, _reference(q, docs, 7)[1])
    assert exact_search(q, docs[:3], 10, backend="torch")[1].shape == (50, 3)


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_consistency_ranks_torch_equals_faiss(top_k):
    rng = np.random.default_rng(3)
    n, dim = 800, 24
    d = rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = (d + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)
    texts = [f"doc {i % 700}" for i in range(n)]  # repeated documents share a key
    for i in range(700, n):
        d[i] = d[i % 700]
    keys = document_keys(texts)
    got = consistency_ranks(q, d, keys, top_k, backend="torch")
    want = consistency_ranks(q, d, keys, top_k, use_gpu=False)
    np.testing.assert_array_equal(got, want)
    assert 1 < len(np.unique(got))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_keyed_index_torch_backend_equals_faiss(dtype):
    rng = np.random.default_rng(4)
    vecs = rng.standard_normal((600, 16)).astype(np.float32)
    keys = rng.permutation(10_000)[:600]
    keys[500:] = keys[:100]  # duplicate keys, kept once
    results = []
    for backend in ("torch", None):
        s = M.KeyedIndex(use_gpu=False, dtype=dtype, backend=backend)
        s.add(keys[:300], vecs[:300])
        s.add(keys[300:], vecs[300:])
        s.finalize()
        assert (s.torch_index is not None) == (backend == "torch")
        results.append(s.search(vecs[:40] + 0.1, 12))
    (ts, tk), (fs, fk) = results
    np.testing.assert_allclose(ts, fs, atol=2e-6)
    np.testing.assert_array_equal(tk, fk)


def test_search_backend_choice():
    assert search_backend(False) == "faiss"
    assert search_backend(None) == "faiss"  # no CUDA on this host: FAISS on the CPU
    assert search_backend(False, "torch") == "torch"
    with pytest.raises(ValueError):
        search_backend(None, "cuvs")
    with pytest.raises(ValueError):
        TorchFlatIP(np.zeros((0, 4), np.float32), device="cpu")
