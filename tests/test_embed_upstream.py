"""Token ids made upstream of the embedding actors (CPU map_batches tasks) encode exactly as the
actor's own tokenization does; the actor reports its tokenize/model time split."""

import numpy as np
import pytest

from raylib.model import Encoder, ModelSpec, TextTokenizer
from raylib.tiny import save_tiny_encoder

WORDS = "the cat sat on the river bank protein cells and genes search retrieval of text".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def prefixed_dir(tmp_path_factory):
    """A tiny mean-pooled model with e5-style prefixes and 24 positions (long texts truncate)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("up") / "m", pooling="mean", max_length=24,
                             query_prefix="query: ", document_prefix="passage: ", seed=2)


def test_encode_features_is_the_model_half_of_encode(prefixed_dir):
    enc = Encoder.from_pretrained(prefixed_dir, device="cpu")
    texts = _texts(37, seed=0)
    ids = TextTokenizer.from_pretrained(prefixed_dir)(texts, "query", padding=False)["input_ids"]
    assert ids == enc.tokenize(texts, "query", padding=False)["input_ids"]
    as_arrays = [np.asarray(row, dtype=np.int32) for row in ids]  # what an Arrow column gives
    got = enc.encode_features(as_arrays, batch_size=8)["dense"]
    assert np.array_equal(got, enc.encode_dense(texts, "query", batch_size=8))
    with pytest.raises(ValueError, match="empty"):
        enc.encode_features([])


def test_tokenize_upstream_auto_follows_the_device():
    from raylib.ray_data.embed import resolve_tokenize_upstream

    assert resolve_tokenize_upstream(None, 0) is False
    assert resolve_tokenize_upstream(None, 1) is True
    assert resolve_tokenize_upstream(True, 0) is True
    assert resolve_tokenize_upstream(False, 0.5) is False


def test_upstream_and_in_actor_tokenization_give_identical_embeddings(ray_session, prefixed_dir):
    import ray

    from raylib.ray_data.consistency import CurationStats
    from raylib.ray_data.embed import embed

    n = 300
    queries, docs = _texts(n, seed=1), _texts(n, seed=2)
    rows = [{"id": i, "query": q, "document": d} for i, (q, d) in enumerate(zip(queries, docs))]
    spec = ModelSpec(str(prefixed_dir), max_length=20)  # a spec, as a job config may give
    out, stats = {}, {}
    for upstream in (False, True):
        stats[upstream] = CurationStats.remote()
        ds = embed(ray.data.from_items(rows, override_num_blocks=3), spec, "query", "query", "q",
                   also=[("document", "document", "d", 16)], batch_size=16, rows_per_call=64,
                   stats=stats[upstream], tokenize_upstream=upstream)
        table = ds.to_pandas().sort_values("id")
        assert sorted(table.columns) == ["d", "document", "id", "q", "query"]  # ids dropped
        out[upstream] = {c: np.stack(table[c].to_numpy()) for c in ("q", "d")}
    for c in ("q", "d"):
        np.testing.assert_allclose(out[True][c], out[False][c], atol=1e-6, rtol=0)
    enc = Encoder.from_pretrained(spec, device="cpu")
    np.testing.assert_allclose(out[True]["q"], enc.encode_dense(queries, "query", max_length=20),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[True]["d"], enc.encode_dense(docs, "document", max_length=16),
                               atol=1e-6, rtol=0)
    in_actor, upstream = (ray.get(stats[u].get.remote()) for u in (False, True))
    assert sum(r for r, _ in in_actor["embed"].values()) == n and not in_actor["tokenize"]
    assert all(s["tokenize_s"] > 0 and s["model_s"] > 0 for s in in_actor["embed_split"].values())
    assert sum(r for r, _ in upstream["tokenize"].values()) == n
    assert sum(s["model_s"] for s in upstream["embed_split"].values()) > 0
