"""Pure curation logic (no Ray): heuristics, de-duplication, sharding, consistency ranks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raylib.filters import (HeuristicConfig, consistency_ranks, document_keys, duplicate_mask,
                            heuristic_reasons, letter_ratio, num_consistency_shards, pair_hash, shard_ids)


def brute_force_ranks(q_emb: np.ndarray, d_emb: np.ndarray, doc_texts: list[str]) -> np.ndarray:
    """Slow obvious reference: 1 + #distinct documents scoring strictly higher than the own one."""
    distinct: dict[str, int] = {}
    for i, text in enumerate(doc_texts):
        distinct.setdefault(text, i)
    out = []
    for i, text in enumerate(doc_texts):
        q = q_emb[i].astype(np.float64)
        own = float(np.dot(q, d_emb[distinct[text]].astype(np.float64)))
        higher = 0
        for other, j in distinct.items():
            if other != text and float(np.dot(q, d_emb[j].astype(np.float64))) > own:
                higher += 1
        out.append(1 + higher)
    return np.array(out)


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("top_k", [1, 3, 10, 200])
def test_consistency_ranks_match_brute_force_with_duplicate_documents(top_k):
    rng = np.random.default_rng(0)
    n, dim = 120, 16
    texts = [f"doc {i}" for i in rng.integers(0, 70, size=n)]  # many identical document texts
    base = {t: rng.normal(size=dim) for t in set(texts)}
    d_emb = _normalize(np.stack([base[t] for t in texts]))
    # queries near their own document so ranks spread over 1..many
    q_emb = _normalize(d_emb + rng.normal(scale=0.9, size=(n, dim)))
    # an exact tie: a different text with the same embedding as another document
    texts[5], d_emb[5] = "tie twin", d_emb[6]
    ref = brute_force_ranks(q_emb, d_emb, texts)
    got = consistency_ranks(q_emb, d_emb, document_keys(texts), top_k, use_gpu=False)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.where(ref <= top_k, ref, top_k + 1))
    assert (ref > 1).any() and (ref == 1).any()  # the set is not trivial


def test_identical_documents_count_once():
    # three pairs share one document text: the other two pairs' copies must not outrank it
    d = _normalize(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    q = _normalize(np.array([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [1.0, 0.9]]))
    texts = ["same", "same", "same", "other"]
    ranks = consistency_ranks(q, d, document_keys(texts), top_k=5, use_gpu=False)
    np.testing.assert_array_equal(ranks, [1, 1, 1, 2])
    # with distinct keys the duplicates are ties, which do not push the own document down
    np.testing.assert_array_equal(consistency_ranks(q, d, [0, 1, 2, 3], 5, use_gpu=False), [1, 1, 1, 4])


def test_consistency_ranks_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        consistency_ranks(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1], 0)
    with pytest.raises(ValueError, match="shape"):
        consistency_ranks(np.zeros((2, 3)), np.zeros((3, 3)), [0, 1], 1)


def test_each_heuristic_is_applied_and_switchable():
    cfg = HeuristicConfig(query_min_chars=3, query_max_chars=50, document_min_chars=10,
                          document_max_chars=200, min_letter_ratio=0.5)
    rows = [
        ("what is ray", "Ray is a framework for distributed computing.", None),
        ("hi", "a document that is long enough", "query_length"),
        ("x" * 60, "a document that is long enough", "query_length"),
        ("a fine query", "short", "document_length"),
        ("a fine query", "d" * 201, "document_length"),
        ("Same Text here ok", "  same text   HERE ok ", "query_equals_document"),
        ("numbers table", "12 34 56 78 90 11 22 33 | -- | 44", "non_text"),
        ("chinese query", "这是一个中文文档，内容是关于分布式计算的。", None),  # letters of any script
    ]
    got = heuristic_reasons([r[0] for r in rows], [r[1] for r in rows], cfg)
    assert got == [r[2] for r in rows]
    off = HeuristicConfig(length=False, query_equals_document=False, non_text=False)
    assert heuristic_reasons([r[0] for r in rows], [r[1] for r in rows], off) == [None] * len(rows)


def test_letter_ratio_and_duplicates():
    assert letter_ratio("abc 123") == 0.5
    assert letter_ratio("   ") == 0.0
    dup = duplicate_mask(["a", "b", "a", "a", "a"], ["x", "x", "x", "y", "x"])
    np.testing.assert_array_equal(dup, [False, False, True, False, True])


def test_shards_are_stable_even_and_keep_duplicates_together():
    assert num_consistency_shards(10, 3) == 4 and num_consistency_shards(0, 3) == 1 and num_consistency_shards(3, 3) == 1
    with pytest.raises(ValueError):
        num_consistency_shards(5, 0)
    assert pair_hash("q", "d") == pair_hash("q", "d") != pair_hash("q", "d ")
    qs = [f"query {i}" for i in range(4000)]
    ds = [f"document {i % 1000}" for i in range(4000)]
    ids = shard_ids(qs + qs[:3], ds + ds[:3], 4)
    assert (ids[-3:] == ids[:3]).all()  # duplicates share a shard
    sizes = np.bincount(ids[:4000], minlength=4)
    assert sizes.min() > 850 and sizes.max() < 1150  # even up to hash noise


def test_document_keys():
    np.testing.assert_array_equal(document_keys(["a", "b", "a", "c", "b"]), [0, 1, 0, 3, 1])


def test_row_reasons_without_ray():
    from raylib.reader import parse_jsonl_lines, row_reasons

    lines = [b'{"query": "q", "document": "d"}', b'{"query": null, "document": "d"}',
             b'{"query": 7, "document": "d"}', b'{"query": " ", "document": "d"}',
             b'{"query": "q", "document": "bad \xff"}', b"not json", b"[1]",
             b'{"document": "d"}', b'{"query": "q", "document": "' + b"x" * 30 + b'"}']
    table = parse_jsonl_lines(lines)
    assert table.column("query").type == pa.string()
    got = row_reasons(table, ["query", "document"], max_chars=20)
    assert got == [None, "null:query", "not_string:query", "empty:query", "undecodable:document",
                   "invalid_json", "not_object", "null:query", "too_long:document"]
    binary = pa.table({"query": pa.array([b"ok", b"\xfe"]), "document": pa.array([1, None])})
    assert row_reasons(binary, ["query", "document"], None) == ["not_string:document", "undecodable:query"]


def unchunked_ranks_reference(q_emb, d_emb, doc_keys, top_k):
    """The consistency_ranks of before the chunked recheck (an [n, k, d] float64 gather), kept
    verbatim as the reference the chunked one must equal bit for bit."""
    from raylib.search import exact_search

    q_emb = np.ascontiguousarray(q_emb, dtype=np.float32)
    d_emb = np.ascontiguousarray(d_emb, dtype=np.float32)
    _, first, own = np.unique(np.asarray(doc_keys), return_index=True, return_inverse=True)
    own = own.reshape(-1)
    docs = d_emb[first]
    k = min(top_k, len(docs))
    _, cand = exact_search(q_emb, docs, k, use_gpu=False)
    q64 = q_emb.astype(np.float64)
    d64 = docs.astype(np.float64)
    own_score = np.einsum("nd,nd->n", q64, d64[own])
    cand_score = np.einsum("nd,nkd->nk", q64, d64[cand])
    higher = (cand_score > own_score[:, None]) & (cand != own[:, None])
    greater = higher.sum(1)
    return np.where(greater < top_k, greater + 1, top_k + 1).astype(np.int64)


@pytest.mark.parametrize("dim,top_k", [(384, 20), (24, 5)])
def test_chunked_ranks_equal_unchunked_reference_with_ties_and_duplicates(dim, top_k):
    rng = np.random.default_rng(7)
    n = 3000
    texts = [f"doc {i}" for i in rng.integers(0, 2200, size=n)]  # ~700 repeated document texts
    base = {t: rng.normal(size=dim) for t in sorted(set(texts))}
    d_emb = _normalize(np.stack([base[t] for t in texts]))
    q_emb = _normalize(d_emb + rng.normal(scale=1.2 / np.sqrt(dim) * 6, size=(n, dim)))
    # planted ties: other texts with exactly the same embedding as some pair's document
    for i in rng.choice(n, size=150, replace=False):
        j = int(rng.integers(0, n))
        texts[i], d_emb[i] = f"twin of {texts[j]} at {i}", d_emb[j]
    # queries equal to another query: identical candidate lists and scores
    q_emb[10:20] = q_emb[0]
    keys = document_keys(texts)
    ref = unchunked_ranks_reference(q_emb, d_emb, keys, top_k)
    assert 0 < (ref == 1).sum() < n and (ref == top_k + 1).any() and ((ref > 1) & (ref <= top_k)).any()
    for chunk_bytes in (1, 10_000, 1 << 20, 1 << 40):  # one row per chunk .. a single chunk
        got = consistency_ranks(q_emb, d_emb, keys, top_k, use_gpu=False, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(got, ref)
    # keys not in row order (a copy of the distinct documents) give the same ranks too
    np.testing.assert_array_equal(consistency_ranks(q_emb, d_emb, [hash(t) for t in texts], top_k,
                                                    use_gpu=False), ref)


def test_all_distinct_documents_are_ranked_without_copying_them():
    rng = np.random.default_rng(3)
    d = _normalize(rng.normal(size=(500, 16)))
    q = _normalize(d + rng.normal(scale=0.5, size=d.shape))
    keys = np.arange(500)
    np.testing.assert_array_equal(consistency_ranks(q, d, keys, 10, use_gpu=False),
                                  unchunked_ranks_reference(q, d, keys, 10))


def test_ranking_bytes_per_pair_is_linear_and_small():
    from raylib.filters import ranking_bytes_per_pair

    # me5-small (d = 384), top-20: inputs 3,072 B + at most 1,840 B of working memory per pair
    assert ranking_bytes_per_pair(384, 20) == 8 * 384 + 4 * 384 + 240 + 64
    assert ranking_bytes_per_pair(384, 20, duplicates=False) < ranking_bytes_per_pair(384, 20)
