"""Pure hard-negative selection (raylib.mining): rules, sharded search, a brute-force reference,
and parity with sentence-transformers' mine_hard_negatives on a tiny synthetic set."""

from __future__ import annotations

import random

import numpy as np
import pytest

from peers import require_peer
from raylib import mining as M
from raylib.search import exact_search


NO_QUERY_DOC = np.array([-1])  # the query's text is not among the candidates


def _ranked(scores):
    s = np.asarray([scores], dtype=np.float32)
    return np.arange(s.shape[1], dtype=np.int64)[None], s


def test_topk_percpos_drops_positives_and_near_positive_scores():
    ids, scores = _ranked([0.99, 0.97, 0.90, 0.86, 0.85, 0.50, 0.40, 0.30])
    rule = M.NegativeRule(strategy="topk_percpos", num_negatives=3, max_pos_ratio=0.95)
    # docs 0 and 3 are known positives; the reference positive score is 0.9
    sel = M.select_negatives(ids, scores, [np.array([0, 3])], np.array([0.9]), rule, NO_QUERY_DOC)
    # cut = 0.855: 0.97 and 0.90 dropped (> cut), 0.86 is a positive, 0.85 kept (not strictly above)
    assert sel.neg_ids.tolist() == [[4, 5, 6]]
    np.testing.assert_allclose(sel.neg_scores[0], [0.85, 0.50, 0.40])
    assert sel.status.tolist() == [M.KEPT] and sel.num_found.tolist() == [3]


def test_a_document_equal_to_the_query_is_never_a_negative():
    """sentence-transformers >= 6.3: a copy of the query in the corpus is a false negative."""
    ids, scores = _ranked([0.99, 0.80, 0.70, 0.60])
    rule = M.NegativeRule(strategy="topk_percpos", num_negatives=2, max_pos_ratio=1.0)
    sel = M.select_negatives(ids, scores, [np.array([3])], np.array([1.0]), rule, np.array([0]))
    assert sel.neg_ids.tolist() == [[1, 2]]
    sel = M.select_negatives(ids, scores, [np.array([3])], np.array([1.0]), rule, NO_QUERY_DOC)
    assert sel.neg_ids.tolist() == [[0, 1]]


def test_text_keys_are_stable_non_negative_and_merge_duplicates():
    keys = M.text_keys(["a", "b", "a", "é" * 50])
    assert (keys >= 0).all() and keys[0] == keys[2] and len(set(keys.tolist())) == 3
    assert keys.tolist() == M.text_keys(["a", "b", "a", "é" * 50]).tolist()
    with pytest.raises(ValueError, match=">= 0"):
        M.KeyedIndex(use_gpu=False).add(np.array([-5]), np.ones((1, 2), np.float32))


def test_percpos_threshold_is_sign_safe():
    np.testing.assert_allclose(M.percpos_threshold(np.array([0.8, -0.4]), 0.95), [0.76, -0.42])


def test_topk_abs_and_too_few_drop_or_pad():
    ids, scores = _ranked([0.9, 0.8, 0.7, 0.6])
    rule = M.NegativeRule(strategy="topk_abs", num_negatives=3, max_score=0.75)
    sel = M.select_negatives(ids, scores, [np.array([3])], np.array([1.0]), rule, NO_QUERY_DOC)
    assert sel.status.tolist() == [M.TOO_FEW_STATUS] and sel.num_found.tolist() == [1]
    assert sel.neg_ids.tolist() == [[-1, -1, -1]]
    rule.too_few = "pad"
    sel = M.select_negatives(ids, scores, [np.array([3])], np.array([1.0]), rule, NO_QUERY_DOC)
    assert sel.status.tolist() == [M.PADDED] and sel.neg_ids.tolist() == [[2, 2, 2]]
    # nothing left at all: even padding cannot help
    sel = M.select_negatives(ids, scores, [np.array([2, 3])], np.array([1.0]), rule, NO_QUERY_DOC)
    assert sel.status.tolist() == [M.TOO_FEW_STATUS]


def test_rank_window_samples_inside_window_seeded():
    k = 50
    ids, scores = _ranked(np.linspace(0.9, 0.1, k))
    rule = M.NegativeRule(strategy="rank_window", num_negatives=5, range_min=10, range_max=30)
    pos = [np.array([0, 12])]  # positives are removed before ranks are counted

    def pick(seed):
        return M.select_negatives(ids, scores, pos, np.array([1.0]), rule, NO_QUERY_DOC, [M.row_seed(seed, 7, 0)])

    a, b, c = pick(1), pick(1), pick(2)
    allowed = [i for i in range(k) if i not in (0, 12)][10:30]
    assert set(a.neg_ids[0]) <= set(allowed) and len(set(a.neg_ids[0])) == 5
    assert a.neg_ids.tolist() == b.neg_ids.tolist() and a.neg_ids.tolist() != c.neg_ids.tolist()
    assert list(a.neg_scores[0]) == sorted(a.neg_scores[0], reverse=True)


def test_rule_validation_errors():
    with pytest.raises(ValueError, match="strategy"):
        M.NegativeRule(strategy="nope").validate()
    with pytest.raises(ValueError, match="max_score"):
        M.NegativeRule(strategy="topk_abs").validate()
    with pytest.raises(ValueError, match="smaller than"):
        M.NegativeRule(strategy="rank_window", range_min=5, range_max=8, num_negatives=7).validate()
    with pytest.raises(ValueError, match="too_few"):
        M.NegativeRule(too_few="maybe").validate()


def test_curriculum_keys_order_by_increasing_hardness():
    pos = np.array([0.9, 0.9, 0.9])
    neg = np.array([[0.1, 0.2], [0.7, 0.8], [0.4, 0.5]])
    for order in ("margin", "mean_neg", "min_neg"):
        assert np.argsort(M.curriculum_key(pos, neg, order)).tolist() == [0, 2, 1]
    with pytest.raises(ValueError):
        M.curriculum_key(pos, neg, "random")


def test_histogram_counts_everything():
    h = M.ScoreHistogram(bins=4)
    h.add(np.array([-2.0, -0.9, 0.1, 0.2, 0.99, 1.5, np.nan]))
    d = h.to_dict()
    assert d["counts"] == [1, 0, 2, 1] and d["below"] == 1 and d["above"] == 1 and d["count"] == 6


def test_sharded_search_equals_one_exact_index():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    keys = np.arange(500, dtype=np.int64) * 7919 + 3
    n = M.num_doc_shards(500, 120)
    assert n == 5
    where = M.shard_of(keys, n)
    shards = []
    for i in range(n):
        s = M.KeyedIndex(use_gpu=False)
        s.add(keys[where == i], docs[where == i])
        s.finalize()
        assert len(s) <= 140
        shards.append(s)
    scores, got = M.search_shards(shards, queries, 25)
    ref_scores, ref_ids = exact_search(queries, docs, 25, use_gpu=False)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (got == keys[ref_ids]).mean() > 0.999
    # scores for given keys come from whichever shard holds them
    some = keys[[3, 77, 400]]
    fromshards = np.full(3, np.nan, np.float32)
    for s in shards:
        fromshards = np.fmax(fromshards, s.scores_for(queries, np.array([0, 1, 2]), some))
    np.testing.assert_allclose(fromshards, np.einsum("ij,ij->i", queries[:3], docs[[3, 77, 400]]), rtol=1e-5)


def test_keyed_index_deduplicates_keys():
    s = M.KeyedIndex(use_gpu=False)
    s.add(np.array([5, 6, 5]), np.eye(3, dtype=np.float32))
    first = s.finalize()
    assert first.tolist() == [0, 1] and s.duplicates == 1 and len(s) == 2
    assert s.positions(np.array([6, 5, 9])).tolist() == [1, 0, -1]


def _brute_force(q, d, keys, own, known, ratio, n_neg, k):
    """Slow obvious reference: full score matrix, sort, drop positives, cut at ratio x min positive."""
    out = []
    full = q @ d.T
    for i in range(len(q)):
        key_score = dict(zip(keys.tolist(), full[i].tolist()))
        ref = min(key_score[p] for p in known[i])
        cut = ref - abs(ref) * (1 - ratio)
        ranked = sorted(range(len(keys)), key=lambda j: -full[i, j])[:k]
        neg = [keys[j] for j in ranked if keys[j] not in set(known[i]) and full[i, j] <= cut][:n_neg]
        out.append(neg)
    return out


def test_mine_in_memory_matches_brute_force_and_is_shard_invariant():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(300, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = (d[:60] + 0.8 * rng.normal(size=(60, 8))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keys = rng.choice(10**12, size=300, replace=False).astype(np.int64)
    own = keys[:60]
    known = [np.array([own[i], keys[100 + i]]) if i % 3 == 0 else np.array([own[i]]) for i in range(60)]
    qk = np.arange(60, dtype=np.int64)
    rule = M.NegativeRule(num_negatives=5, max_pos_ratio=0.95, too_few="pad")
    ref = _brute_force(q, d, keys, own, known, 0.95, 5, 40)
    for shards in (None, 64):
        sel, own_scores, _ = M.mine_in_memory(q, qk, own, known, d, keys, rule, 40, shards)
        np.testing.assert_allclose(own_scores, np.einsum("ij,ij->i", q, d[:60]), rtol=1e-5)
        for i in range(60):
            got = [x for x in sel.neg_ids[i] if x >= 0]
            assert list(dict.fromkeys(got)) == ref[i][:5], i


def test_parity_with_sentence_transformers_tiny(tmp_path):
    """Same negatives as `mine_hard_negatives(relative_margin=m, sampling_strategy="top")` with
    max_pos_ratio = 1 - m, on a tiny synthetic set with a tiny mean-pooled model both libraries load.
    (m = 0.02 rather than 0.05: the random tiny model scores everything within a few percent.)
    Some queries' own texts are in the corpus: neither side may return them as negatives."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    # sentence-transformers 6.3.0 retrieves range_max + max_positives + 1 candidates and never
    # returns the query's own text as a negative (6.2.0: range_max + max_positives, and it could)
    require_peer("sentence-transformers")

    from raylib.model import Encoder
    from raylib.tiny import save_tiny_encoder

    path = save_tiny_encoder(tmp_path / "tiny_mean", pooling="mean")
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
             "sigma tau upsilon phi chi psi omega").split()
    r = random.Random(0)
    queries = [" ".join(r.choices(words, k=3)) for _ in range(40)]
    docs = [q + " " + " ".join(r.choices(words, k=10)) for q in queries]
    queries += queries[:5]                       # 5 queries with a second positive
    docs += [" ".join(r.choices(words, k=12)) for _ in range(5)]
    corpus = [" ".join(r.choices(words, k=12)) for _ in range(150)] + queries[:8]
    n_neg, range_max, margin = 5, 60, 0.02
    st = SentenceTransformer(str(path), device="cpu")
    mined = mine_hard_negatives(Dataset.from_dict({"query": queries, "answer": docs}), st, corpus=corpus,
                                relative_margin=margin, range_max=range_max, num_negatives=n_neg,
                                sampling_strategy="top", output_format="triplet", verbose=False)
    st_sets: dict[str, set] = {}
    for row in mined:
        st_sets.setdefault(row["query"], set()).add(row["negative"])

    enc = Encoder.from_pretrained(path)
    all_docs = list(dict.fromkeys(corpus + docs))   # ST's corpus: given corpus + positives, deduplicated
    d_keys = M.text_keys(all_docs)
    d_emb = enc.encode_dense(all_docs, "document")
    uq = list(dict.fromkeys(queries))
    pos_of = {q: [] for q in uq}
    for q, d in zip(queries, docs):
        pos_of[q].append(d)
    q_emb = enc.encode_dense(uq, "query")
    own = M.text_keys([pos_of[q][0] for q in uq])
    known = [M.text_keys(pos_of[q]) for q in uq]
    rule = M.NegativeRule(num_negatives=n_neg, max_pos_ratio=1 - margin, too_few="pad", pos_reference="min")
    max_pos = max(len(v) for v in pos_of.values())
    sel, _, _ = M.mine_in_memory(q_emb, M.text_keys(uq), own, known, d_emb, d_keys, rule,
                                 candidates=range_max + max_pos + 1)  # ST 6.3's candidate count
    text_of = dict(zip(d_keys.tolist(), all_docs))
    ours = {q: {text_of[k] for k in sel.neg_ids[i] if k >= 0} for i, q in enumerate(uq)}
    same = sum(ours[q] == st_sets.get(q, set()) for q in uq)
    assert 0 < sum(len(v) for v in ours.values()) < n_neg * len(uq)  # some rows short, some full
    assert not any(q in ours[q] for q in uq)
    assert same == len(uq), {q: (ours[q], st_sets.get(q)) for q in uq if ours[q] != st_sets.get(q, set())}


# ----------------------------------------------------------------------------- byte budgets
GB = 10**9


def test_plan_fits_20m_1024d_teacher_on_80gb_gpus_with_headroom():
    budget32 = M.IndexBudget(memory_bytes=80 * GB, dtype="fp32")
    plan = M.plan_shards(20_000_000, 1024, budget32, candidates=100, query_batch=4096, on_gpu=True)
    # 20M x 1024 x 4 B = 81.9 GB: an fp32 index needs two 80 GB GPUs once room is left for search
    assert plan.num_shards == 2 and plan.bytes_per_doc == 4096
    assert plan.reserved_bytes >= budget32.workspace_bytes + 4096 * 1024 * 4 + 4096 * 100 * 12
    assert plan.index_bytes + plan.reserved_bytes <= 80 * GB
    # the hash cut itself: no shard holds more than the capacity
    keys = np.random.default_rng(0).integers(0, 2**62, size=20_000_000, dtype=np.int64)
    sizes = np.bincount(M.shard_of(keys, plan.num_shards), minlength=plan.num_shards)
    assert sizes.max() <= plan.docs_per_shard
    assert sizes.max() * plan.bytes_per_doc + plan.reserved_bytes <= 80 * GB
    # fp16 storage halves the index: the whole corpus fits one GPU, with the same headroom
    plan16 = M.plan_shards(20_000_000, 1024, M.IndexBudget(memory_bytes=80 * GB, dtype="fp16"),
                           candidates=100, query_batch=4096, on_gpu=True)
    assert plan16.num_shards == 1 and plan16.bytes_per_doc == 2048
    assert 20_000_000 * 2048 + plan16.reserved_bytes <= 80 * GB
    assert plan16.host_bytes_per_doc == 4 * 1024 + 16  # fp32 copy on the host for the recheck


def test_plan_budget_too_small_for_one_document_is_a_clear_error():
    budget = M.IndexBudget(memory_bytes=3 << 30, dtype="fp32")  # only the workspace
    with pytest.raises(ValueError, match="cannot hold one 1024-d fp32 document"):
        M.plan_shards(1000, 1024, budget, candidates=100, query_batch=4096, on_gpu=True)
    with pytest.raises(ValueError, match="dtype"):
        M.plan_shards(1000, 8, M.IndexBudget(memory_bytes=GB, dtype="int8"), 10, 16, False)


def test_plan_cpu_counts_host_bytes_and_streaming_docs_so_far():
    reserve = (1 << 30) + 64 * 4 + 10 * 12  # workspace + one query + its 10 results
    budget = M.IndexBudget(memory_bytes=reserve + 100 * (4 * 64 + 16) + 50, workspace_bytes=1 << 30)
    plan = M.plan_shards(1000, 64, budget, candidates=10, query_batch=1, on_gpu=False)
    assert plan.bytes_per_doc == 4 * 64 + 16 and plan.reserved_bytes == reserve
    assert plan.docs_per_shard == 100
    # 10 shards would average 100: hash cuts need room (e + 6 sqrt(e) <= 100 -> e <= 55)
    assert plan.num_shards == 19 and plan.expected_docs <= 55
    assert plan.shards_for(50) == 1 and plan.shards_for(1000) == 10  # documents so far
    # without a byte budget the count-based plan is unchanged
    assert M.plan_shards(1000, 64, M.IndexBudget(), 10, 1, False, max_docs_per_shard=120).num_shards == \
        M.num_doc_shards(1000, 120) == 9


@pytest.mark.parametrize("oversample", [1.0, 2.0])
def test_fp16_index_with_fp32_recheck_equals_fp32_index(oversample):
    rng = np.random.default_rng(5)
    docs = rng.normal(size=(3000, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    docs[100:150] = docs[50:100] + 1e-4  # near-ties that fp16 storage cannot tell apart
    queries = (docs[:300] + 0.5 * rng.normal(size=(300, 32))).astype(np.float32)
    keys = rng.choice(10**12, size=3000, replace=False).astype(np.int64)
    ref = M.KeyedIndex(use_gpu=False)
    ref.add(keys, docs)
    ref.finalize()
    half = M.KeyedIndex(use_gpu=False, dtype="fp16", oversample=oversample)
    for s in range(0, 3000, 700):  # several batches, compacted at finalize
        half.add(keys[s:s + 700], docs[s:s + 700])
    half.finalize()
    ref_scores, ref_keys = ref.search(queries, 30)
    scores, got = half.search(queries, 30)
    np.testing.assert_array_equal(got, ref_keys)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=2e-6)
    if oversample == 1.0:  # no margin: the bound cannot certify rows, which are searched again
        assert half.rechecked_rows > 0
    np.testing.assert_allclose(half.scores_for(queries, np.arange(5), keys[:5]),
                               ref.scores_for(queries, np.arange(5), keys[:5]))


def test_keyed_index_gpu_request_falls_back_on_cpu_when_no_gpu():
    from raylib.search import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present: the fallback is not exercised")
    s = M.KeyedIndex(use_gpu=True, dtype="fp16")
    s.add(np.array([3, 1, 3]), np.eye(3, dtype=np.float32))
    s.finalize()
    scores, keys = s.search(np.eye(3, dtype=np.float32), 2)
    assert keys[0, 0] == 3 and keys[1, 0] == 1 and scores[0, 0] == 1.0


def test_mine_job_plans_shards_from_its_index_budget():
    from raylib.jobs.mine import MineJobConfig, index_budget, shard_plan

    cfg = MineJobConfig()
    assert index_budget(cfg) == M.IndexBudget()  # no budget given: the count-based plan
    assert shard_plan(cfg, 2_500_000, 384).num_shards == M.num_doc_shards(2_500_000, cfg.max_docs_per_shard)
    cfg.index = M.IndexBudget(memory_bytes=80 * GB, dtype="fp16")  # the `index:` section of mine/h100.yaml
    cfg.max_docs_per_shard = None
    cfg.resources.shard_num_gpus, cfg.resources.mine_batch_size = 1, 4096
    plan = shard_plan(cfg, 20_000_000, 1024)
    assert plan.num_shards == 1 and plan.bytes_per_doc == 2048
    cfg.index = M.IndexBudget(memory_bytes=80 * GB, dtype="fp32")
    assert shard_plan(cfg, 20_000_000, 1024).num_shards == 2
