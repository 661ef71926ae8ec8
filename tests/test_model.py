"""The Encoder against its peers (sentence-transformers, FlagEmbedding's BGEM3FlagModel),
save/load round trips, Matryoshka truncation and bad input."""

import logging

import numpy as np
import pytest
import torch

from raylib import Encoder
from raylib.model import truncate_dims
from raylib.scoring import compute_score, lexical_scores, multivector_scores
from raylib.tiny import save_tiny_encoder, tiny_encoder

TEXTS = ["the cat sat on the river bank", "protein cells and genes", "a",
         "search retrieval embedding of text in python " * 3, "the king of the mountain music"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformers_parity_and_exact_round_trip(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    path = save_tiny_encoder(tmp_path / "m", pooling=pooling, seed=3)
    ours = Encoder.from_pretrained(path, device="cpu")
    st = SentenceTransformer(str(path), device="cpu")
    ref = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    got = ours.encode_dense(TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    again = Encoder.from_pretrained(ours.save_pretrained(tmp_path / "again"), device="cpu")
    assert np.array_equal(again.encode_dense(TEXTS), got)  # bit-identical
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_minilm_loads_with_its_pooling():
    from sentence_transformers import SentenceTransformer

    from raylib.registry import resolve_model_path

    ours = Encoder.from_pretrained("minilm", device="cpu")
    assert (ours.settings.pooling, ours.settings.normalize, ours.dim) == ("mean", True, 384)
    st = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    np.testing.assert_allclose(ours.encode_dense(TEXTS[:3]), st.encode(TEXTS[:3]), atol=1e-5)


def test_bge_m3_layout_matches_flagembedding(tiny_xlmr_dir):
    from FlagEmbedding import BGEM3FlagModel

    ours = Encoder.from_pretrained(tiny_xlmr_dir, device="cpu")
    ref_model = BGEM3FlagModel(str(tiny_xlmr_dir), use_fp16=False, devices="cpu")
    ref = ref_model.encode(TEXTS, batch_size=2, return_dense=True, return_sparse=True,
                           return_colbert_vecs=True)
    got = ours.encode(TEXTS, batch_size=2, sparse=True, multivector=True)
    np.testing.assert_allclose(got["dense"], ref["dense_vecs"], atol=1e-5)
    for mine, theirs in zip(got["sparse"], ref["lexical_weights"]):
        assert set(mine) == {int(k) for k in theirs}
        for k, w in theirs.items():
            assert abs(mine[int(k)] - float(w)) < 1e-5
    for mine, theirs in zip(got["multivector"], ref["colbert_vecs"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    # scores: per pair against FlagEmbedding's own functions and compute_score (batch_size=1: no padding)
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[4], TEXTS[0]), (TEXTS[3], TEXTS[3])]
    weights = [0.4, 0.2, 0.4]
    ref_scores = ref_model.compute_score(pairs, batch_size=1, weights_for_different_modes=weights)
    mine = compute_score(ours, pairs, weights)
    for ours_key, ref_key in [("dense", "dense"), ("sparse", "sparse"), ("multivector", "colbert"),
                              ("sparse+dense", "sparse+dense"), ("hybrid", "colbert+sparse+dense")]:
        np.testing.assert_allclose(mine[ours_key], ref_scores[ref_key], atol=1e-5, err_msg=ours_key)
    lex = lexical_scores(got["sparse"][:2], got["sparse"])
    assert abs(lex[0, 1] - ref_model.compute_lexical_matching_score(
        ref["lexical_weights"][0], ref["lexical_weights"][1])) < 1e-5
    mul = multivector_scores(got["multivector"][:2], got["multivector"])
    assert abs(mul[1, 0] - float(ref_model.colbert_score(ref["colbert_vecs"][1], ref["colbert_vecs"][0]))) < 1e-5


def test_bge_m3_round_trip_keeps_heads(tmp_path, tiny_xlmr_dir):
    ours = Encoder.from_pretrained(tiny_xlmr_dir, device="cpu")
    again = Encoder.from_pretrained(ours.save_pretrained(tmp_path / "m3"), device="cpu")
    a = ours.encode(TEXTS, sparse=True, multivector=True)
    b = again.encode(TEXTS, sparse=True, multivector=True)
    assert np.array_equal(a["dense"], b["dense"]) and a["sparse"] == b["sparse"]
    assert all(np.array_equal(x, y) for x, y in zip(a["multivector"], b["multivector"]))


def test_encode_is_independent_of_batching_and_order():
    enc = tiny_encoder(m3_heads=True, seed=1)
    one = enc.encode(TEXTS, batch_size=1, sparse=True, multivector=True)
    many = enc.encode(TEXTS, batch_size=16, sparse=True, multivector=True)
    np.testing.assert_allclose(one["dense"], many["dense"], atol=1e-6)
    for x, y in zip(one["multivector"], many["multivector"]):
        np.testing.assert_allclose(x, y, atol=1e-6)
    rev = enc.encode_dense(TEXTS[::-1])
    np.testing.assert_allclose(rev[::-1], one["dense"], atol=1e-6)


def test_special_tokens_get_no_lexical_weight():
    enc = tiny_encoder(m3_heads=True)
    sparse = enc.encode(TEXTS, sparse=True, dense=False)["sparse"]
    special = set(enc.special_token_ids)
    assert all(special.isdisjoint(row) for row in sparse)
    assert any(row for row in sparse)


def test_matryoshka_dim_truncates_and_renormalizes():
    enc = tiny_encoder()
    full = enc.encode_dense(TEXTS)
    cut = enc.encode_dense(TEXTS, dim=8)
    assert cut.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut, truncate_dims(full, 8), atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        enc.encode_dense(TEXTS, dim=enc.dim + 1)


def test_prefixes_are_applied_per_kind():
    enc = tiny_encoder(query_prefix="query: ", document_prefix="passage: ")
    plain = tiny_encoder()
    q = enc.encode_dense(["cat"], kind="query")
    np.testing.assert_allclose(q, plain.encode_dense(["query: cat"]), atol=1e-6)
    assert not np.allclose(q, enc.encode_dense(["cat"], kind="document"))
    with pytest.raises(ValueError, match="kind"):
        enc.encode(["cat"], kind="passage")


@pytest.mark.parametrize("bad,match", [
    ([], "empty"), ([""], r"texts\[0\]"), (["ok", "   "], r"texts\[1\]"), ([None], "string"),
    (["ok", 3], r"texts\[1\] must be a string"), (42, "list of strings"),
])
def test_bad_input_is_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_encoder().encode(bad)


def test_long_texts_are_truncated_with_one_warning(caplog):
    enc = tiny_encoder(max_length=16)
    long = "the cat " * 500
    with caplog.at_level(logging.WARNING, logger="raylib.model"):
        a = enc.encode_dense([long, long + "dog"])
        enc.encode_dense([long])
    assert sum("truncated" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(a[0], a[1], atol=1e-6)  # only the first 16 tokens count


def test_unknown_model_name_is_a_value_error():
    with pytest.raises(ValueError, match="neither a known name"):
        Encoder.from_pretrained("no-such-model-xyz")
