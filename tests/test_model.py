"""The Encoder against its peers (sentence-transformers, FlagEmbedding's BGEM3FlagModel),
save/load round trips, Matryoshka truncation and bad input."""

import logging

import numpy as np
import pytest
import torch

from peers import require_peer
from raylib import Encoder
from raylib.encoding import truncate_dims
from raylib.scoring import compute_score, lexical_scores, multivector_scores
from raylib.tiny import save_tiny_encoder, tiny_encoder

TEXTS = ["the cat sat on the river bank", "protein cells and genes", "a",
         "search retrieval embedding of text in python " * 3, "the king of the mountain music"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformers_parity_and_exact_round_trip(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    require_peer("sentence-transformers")
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

    require_peer("flagembedding")
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


# ----------------------------------------------------------------- model specs (plain HF dirs)
def _plain_hf_dir(path, **kwargs):
    """A tiny encoder saved as only the HF files (no raylib settings, no sentence-transformers)."""
    enc = tiny_encoder(**kwargs)
    enc.backbone.save_pretrained(str(path))
    enc.tokenizer.save_pretrained(str(path))
    return path, enc


def test_plain_hf_dir_warns_and_spec_settings_apply(tmp_path, caplog):
    from raylib.model import ModelSpec

    path, ref = _plain_hf_dir(tmp_path / "plain", seed=5)
    with caplog.at_level(logging.WARNING, logger="raylib.model"):
        cls_enc = Encoder.from_pretrained(path, device="cpu")
    assert any("no pooling information" in r.message for r in caplog.records)
    assert cls_enc.settings.pooling == "cls" and cls_enc.settings.query_prefix == ""
    caplog.clear()
    spec = ModelSpec(str(path), pooling="mean", normalize=False, max_length=32,
                     query_prefix="query: ", document_prefix="passage: ")
    with caplog.at_level(logging.WARNING, logger="raylib.model"):
        mean_enc = Encoder.from_pretrained(spec, device="cpu")
    assert not caplog.records  # the spec gives the pooling: nothing to warn about
    s = mean_enc.settings
    assert (s.pooling, s.normalize, s.max_length) == ("mean", False, 32)
    # mean pooling changes the embedding, and equals a masked mean of the hidden states
    assert not np.allclose(mean_enc.encode_dense(TEXTS), cls_enc.encode_dense(TEXTS), atol=1e-3)
    batch = ref.tokenize(["passage: " + TEXTS[0]])
    with torch.no_grad():
        hidden = ref.backbone(**batch).last_hidden_state
    np.testing.assert_allclose(mean_enc.encode_dense(TEXTS[:1])[0], hidden[0].mean(0).numpy(), atol=1e-5)
    # prefixes are prepended per kind; keyword overrides win over the spec's fields
    no_prefix = Encoder.from_pretrained(spec, device="cpu", query_prefix="", document_prefix="")
    np.testing.assert_allclose(mean_enc.encode_dense(["cat"], "query"),
                               no_prefix.encode_dense(["query: cat"], "query"), atol=1e-6)


def test_model_spec_rejects_bad_settings():
    from raylib.model import ModelSpec

    with pytest.raises(ValueError, match="pooling"):
        ModelSpec("minilm", pooling="max")
    with pytest.raises(ValueError, match="max_length"):
        ModelSpec("minilm", max_length=0)


def test_config_field_takes_a_name_or_a_model_spec():
    from dataclasses import dataclass

    from raylib.config import from_dict, to_dict
    from raylib.model import ModelSpec

    @dataclass
    class Job:
        model: str | ModelSpec = "minilm"

    assert from_dict(Job, {"model": "minilm"}).model == "minilm"
    spec = from_dict(Job, {"model": {"name_or_path": "/m", "pooling": "mean", "query_prefix": "query: ",
                                     "trust_remote_code": "true"}}).model
    assert spec == ModelSpec("/m", trust_remote_code=True, pooling="mean", query_prefix="query: ")
    assert from_dict(Job, to_dict(Job(spec))).model == spec  # round trip through a dict
    with pytest.raises(ValueError, match="pooling"):
        from_dict(Job, {"model": {"name_or_path": "/m", "pooling": "max"}})
    with pytest.raises(ValueError, match="poolin"):
        from_dict(Job, {"model": {"name_or_path": "/m", "poolin": "mean"}})


REMOTE_CODE = '''
from transformers import BertConfig, BertModel


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote"


class TinyRemoteModel(BertModel):
    config_class = TinyRemoteConfig
'''


def test_trust_remote_code_is_forwarded_to_transformers(tmp_path):
    """A dir whose architecture is its own code (auto_map), as Arctic-Embed 2.0's base ships."""
    import json

    enc = tiny_encoder(seed=7)
    path = enc.save_pretrained(tmp_path / "remote")
    (path / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny-remote", architectures=["TinyRemoteModel"],
                  auto_map={"AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
                            "AutoModel": "modeling_tiny_remote.TinyRemoteModel"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code: true"):
        Encoder.from_pretrained(path, device="cpu")
    loaded = Encoder.from_pretrained(path, device="cpu", trust_remote_code=True)
    assert type(loaded.backbone).__name__ == "TinyRemoteModel"
    np.testing.assert_allclose(loaded.encode_dense(TEXTS), enc.encode_dense(TEXTS), atol=1e-6)


def test_load_report_filter_drops_only_the_pooler_we_leave_out():
    import logging

    from raylib.model import _PoolerOnlyReport

    def record(rows: str) -> logging.LogRecord:
        msg = f"BertModel LOAD REPORT from: x\nKey | Status |  |\n----+----+\n{rows}\nNotes: ..."
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, msg, None, None)

    f = _PoolerOnlyReport()
    assert not f.filter(record("pooler.dense.weight | UNEXPECTED |  |\npooler.dense.bias | UNEXPECTED |  |"))
    assert f.filter(record("pooler.dense.weight | UNEXPECTED |  |\nencoder.layer.0.x | MISSING |  |"))
    assert f.filter(logging.LogRecord("t", logging.WARNING, "", 0, "another warning", None, None))


def test_sentence_transformers_6_directory_layout(tmp_path):
    """sentence-transformers >= 6 saves Pooling as {"pooling_mode": ...} and the max length only
    in tokenizer_config.json: both are read (a model their trainer saved loads as it was trained)."""
    import json

    from raylib.tiny import save_tiny_encoder

    path = save_tiny_encoder(tmp_path / "m", pooling="mean", max_length=48)
    (path / "raylib_settings.json").unlink()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    enc = Encoder.from_pretrained(path, device="cpu")
    assert enc.settings.pooling == "mean" and enc.settings.max_length == 48 and enc.settings.normalize
