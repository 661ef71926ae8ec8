"""Evaluation of BEIR sets holding empty or whitespace-only texts: encoded as sentence-transformers
(and so MTEB) encodes them, counted, and scored without an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raylib.beir import load_beir
from raylib.evaluation import encode_all, evaluate_encoder
from raylib.model import Encoder
from raylib.tiny import save_tiny_encoder


def write_beir(root: Path, seed: int = 0) -> Path:
    """A small BEIR dir: 30 documents (3 empty: "", spaces, no text field) and 10 queries
    (one empty, one whitespace only), a BOM before the first corpus line."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river mountain cloud engine protein galaxy".split()
    root.mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(words, 6))} for i in range(30)]
    docs[4]["text"], docs[11]["text"] = "", "   \n "
    del docs[17]["text"]
    (root / "corpus.jsonl").write_text("\ufeff" + "\n".join(json.dumps(d) for d in docs) + "\n",
                                       encoding="utf-8")
    queries = [{"_id": f"q{i}", "text": docs[3 * i]["text"][:20] if i else "x"} for i in range(10)]
    queries[2]["text"], queries[5]["text"] = "", "\t "
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (root / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{3 * i}\t1" for i in range(10)]
    rows.append("q1\td4\t1")  # an empty document that is relevant
    (root / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("eval") / "m", pooling="mean", seed=5,
                             m3_heads=True)


def test_empty_texts_are_counted_and_evaluated(model_dir, tmp_path):
    data = load_beir(write_beir(tmp_path / "beir"))
    assert len(data.corpus) == 30 and len(data.queries) == 10
    assert data.empty_counts() == {"empty_queries": 2, "empty_documents": 3}
    enc = Encoder.from_pretrained(model_dir, device="cpu")
    with pytest.raises(ValueError, match="empty or whitespace only"):
        enc.encode(data.doc_texts())  # what evaluation used to call: a caller's input error
    results = evaluate_encoder(enc, data, modes=("dense", "sparse", "multivector", "hybrid"),
                               quantization=("none", "int8"), k=10)
    assert set(results) == {"dense", "dense/int8", "sparse", "multivector", "hybrid"}
    for values in results.values():
        assert set(values) == {"ndcg@10", "recall@100", "mrr@10"}
        assert all(np.isfinite(v) and 0 <= v <= 1 for v in values.values())


def test_evaluate_with_mcls_encodes_both_sides_with_it(model_dir, tmp_path):
    from raylib.jobs.evaluate import EvaluateConfig

    data = load_beir(write_beir(tmp_path / "beir"))
    enc = Encoder.from_pretrained(model_dir, device="cpu")
    got = encode_all(enc, data.doc_texts(), "document", mcls=2)["dense"]
    full = [i for i, t in enumerate(data.doc_texts()) if t.strip()]
    np.testing.assert_allclose(got[full], enc.encode([data.doc_texts()[i] for i in full], mcls=2)["dense"],
                               atol=1e-6)
    results = evaluate_encoder(enc, data, modes=("dense",), dims=(16,), k=10, mcls=2)
    assert set(results) == {"dense", "dense@16"}
    with pytest.raises(ValueError, match="dense head only"):
        evaluate_encoder(enc, data, modes=("dense", "sparse"), mcls=2)
    with pytest.raises(ValueError, match="mcls"):
        EvaluateConfig(model=str(model_dir), data="x", mcls=4, backend="onnx")


def test_encode_all_matches_encode_and_sentence_transformers(model_dir):
    from sentence_transformers import SentenceTransformer

    from peers import require_peer

    require_peer("sentence-transformers")
    enc = Encoder.from_pretrained(model_dir, device="cpu")
    texts = ["river mountain cloud", "", "protein galaxy engine alpha", "  \t", "beta"]
    got = encode_all(enc, texts, "document", dense=True, sparse=True, multivector=True)
    full = [0, 2, 4]
    ref = enc.encode([texts[i] for i in full], "document", sparse=True, multivector=True)
    assert np.array_equal(got["dense"][full], ref["dense"])  # non-empty texts: exactly encode's
    assert [got["sparse"][i] for i in full] == ref["sparse"]
    for i, j in enumerate(full):
        assert np.array_equal(got["multivector"][j], ref["multivector"][i])
    assert got["sparse"][1] == {} and got["multivector"][1].shape[0] == 1  # [SEP] only
    st = SentenceTransformer(str(model_dir), device="cpu")
    np.testing.assert_allclose(got["dense"], st.encode(texts, convert_to_numpy=True), atol=1e-5)


def test_hybrid_weight_search_from_head_scores_equals_evaluate_encoded(model_dir, tmp_path):
    """bench/m3_hybrid_weights.py's path (head score matrices once, then fuse and rank per weight
    triple) gives evaluate_encoded's hybrid result for every triple, and weights matter."""
    from raylib.evaluation import evaluate_encoded, evaluate_scores
    from raylib.scoring import hybrid_scores, score_encoded

    data = load_beir(write_beir(tmp_path / "beir"))
    enc = Encoder.from_pretrained(model_dir, device="cpu")
    kw = dict(dense=True, sparse=True, multivector=True)
    qids, dids = list(data.queries), data.doc_ids()
    q = encode_all(enc, [data.queries[i] for i in qids], "query", **kw)
    d = encode_all(enc, data.doc_texts(), "document", **kw)
    full = score_encoded(q, d)
    seen = set()
    for w in ([0.4, 0.2, 0.4], [0.1, 0.0, 0.9], [0.8, 0.1, 0.1]):
        fused = hybrid_scores(full["dense"], full["sparse"], full["multivector"], w)
        got = evaluate_scores(fused, qids, dids, data.qrels, ["ndcg@10", "mrr@10"], k=10)
        want = evaluate_encoded(q, d, qids, dids, data.qrels, ["hybrid"], metrics=["ndcg@10", "mrr@10"],
                                k=10, weights=w)["hybrid"]
        assert got == want
        seen.add(round(got["ndcg@10"], 6))
    assert len(seen) > 1
