"""ONNX Runtime backends (raylib/backends.py) against the torch Encoder on tiny seeded models:
fp32 equal within 1e-4 on every head, int8 close, exports beside the model and reused."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

TEXTS = ["the cat sat on the mat", "ray serve batches requests of different lengths in one go",
         "x", "protein cell gene expression patient risk " * 6, "what is the capital city?"]


@pytest.fixture(scope="module")
def prefixed_dir(tmp_path_factory):
    """A tiny M3 model with query/document prefixes (XLM-R layout: pad id 1, <s>/</s>)."""
    from raylib.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("onnx_m3") / "model", arch="xlm-roberta",
                             m3_heads=True, seed=3, query_prefix="query: ",
                             document_prefix="passage: ")


def test_one_encode_loop_behind_every_backend():
    """Both backends run raylib.encoding's loop; each supplies only the forward of one batch."""
    from raylib.backends import OnnxEncoder
    from raylib.encoding import BatchEncoder
    from raylib.model import Encoder

    for backend in (Encoder, OnnxEncoder):
        assert issubclass(backend, BatchEncoder)
        assert backend.encode is BatchEncoder.encode
        assert "_forward" in vars(backend)
    assert OnnxEncoder.encode_features is BatchEncoder.encode_features


def _sparse_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x.get(k, 0.0) - y.get(k, 0.0)) for x, y in zip(a, b) for k in set(x) | set(y))


@pytest.mark.parametrize("kind", ["query", "document"])
def test_onnx_fp32_equals_torch_on_every_head(prefixed_dir, kind):
    from raylib.backends import load_encoder

    torch_enc = load_encoder(prefixed_dir, "torch", device="cpu")
    onnx_enc = load_encoder(prefixed_dir, "onnx", threads=1)
    assert onnx_enc.info()["has_sparse"] and onnx_enc.info()["has_multivector"]
    want = torch_enc.encode(TEXTS, kind=kind, sparse=True, multivector=True, batch_size=2)
    got = onnx_enc.encode(TEXTS, kind=kind, sparse=True, multivector=True, batch_size=2)
    np.testing.assert_allclose(got["dense"], want["dense"], atol=1e-4)
    assert [set(r) for r in got["sparse"]] == [set(r) for r in want["sparse"]]
    assert _sparse_diff(got["sparse"], want["sparse"]) < 1e-4
    for g, w in zip(got["multivector"], want["multivector"]):
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-4)
    cut = onnx_enc.encode(TEXTS, kind=kind, dim=8)["dense"]
    np.testing.assert_allclose(cut, torch_enc.encode(TEXTS, kind=kind, dim=8)["dense"], atol=1e-4)


def test_int8_is_close_and_tokenize_once_gives_the_counts(tiny_dir):
    """tokenize + encode_features (the halves a server and evaluate_encoder call) on int8."""
    from raylib.model import Encoder
    from raylib.backends import load_encoder

    ref = Encoder.from_pretrained(tiny_dir, device="cpu")
    int8 = load_encoder(tiny_dir, "onnx-int8", threads=1)
    ids = int8.tokenize(TEXTS, "document")["input_ids"]
    assert [len(x) for x in ids] == [
        len(x) for x in ref.tokenize(TEXTS, "document", padding=False)["input_ids"]]
    got = int8.encode_features(ids, sparse=True, multivector=True, batch_size=len(ids))
    want = ref.encode(TEXTS, kind="document", sparse=True, multivector=True)
    cos = (got["dense"] * want["dense"]).sum(1)
    assert cos.min() > 0.99, cos
    assert _sparse_diff(got["sparse"], want["sparse"]) < 0.05
    assert all(g.shape == w.shape for g, w in zip(got["multivector"], want["multivector"]))


def test_export_lands_beside_the_model_and_is_reused(tmp_path):
    from raylib.backends import ONNX_DIR, export_onnx, load_encoder
    from raylib.tiny import save_tiny_encoder

    path = save_tiny_encoder(tmp_path / "plain", m3_heads=False)
    folder = export_onnx(path)
    assert folder == path / ONNX_DIR
    stamps = {f.name: f.stat().st_mtime_ns for f in folder.glob("*.onnx")}
    assert set(stamps) == {"model.onnx", "model_int8.onnx"}
    export_onnx(path)  # current: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.onnx")} == stamps
    weights = path / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))
    export_onnx(path)  # the weights changed: exported again
    assert (folder / "model.onnx").stat().st_mtime_ns != stamps["model.onnx"]
    enc = load_encoder(path, "onnx")
    assert not enc.has_sparse and not enc.has_multivector
    with pytest.raises(ValueError, match="sparse"):
        enc.encode(["a"], sparse=True)


def test_user_errors_are_value_errors(tiny_dir):
    from raylib.backends import load_encoder

    with pytest.raises(ValueError, match="backend"):
        load_encoder(tiny_dir, "tensorrt")
    enc = load_encoder(tiny_dir, "onnx")
    for bad in ([], [""], ["ok", 3]):
        with pytest.raises(ValueError):
            enc.encode(bad)
    with pytest.raises(ValueError, match="kind"):
        enc.encode(["a"], kind="passage")
    with pytest.raises(ValueError, match="dim"):
        enc.encode(["a"], dim=33)


def test_evaluate_encoder_takes_an_onnx_backend(tiny_dir):
    """raylib.evaluation.evaluate_encoder scores the same with onnx fp32 as with torch."""
    from raylib.beir import BeirData
    from raylib.evaluation import evaluate_encoder
    from raylib.backends import load_encoder

    corpus = {f"d{i}": {"title": "", "text": t} for i, t in enumerate(TEXTS)}
    corpus["empty"] = {"title": "", "text": ""}  # evaluate encodes empty documents too
    queries = {f"q{i}": t.split()[0] + " " + t.split()[-1] for i, t in enumerate(TEXTS)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(TEXTS))}
    data = BeirData(corpus=corpus, queries=queries, qrels=qrels)
    want = evaluate_encoder(load_encoder(tiny_dir, "torch", device="cpu"), data)
    got = evaluate_encoder(load_encoder(tiny_dir, "onnx"), data)
    assert got["dense"] == pytest.approx(want["dense"], abs=1e-6)


def test_serve_args_take_a_model_spec_and_onnx_refuses_its_overrides(tiny_dir):
    from raylib.model import ModelSpec
    from raylib.backends import load_encoder
    from raylib.ray_serve.settings import ServeArgs

    args = ServeArgs.model_validate({"model": {"name_or_path": str(tiny_dir), "pooling": "mean",
                                               "trust_remote_code": False}})
    assert isinstance(args.model, ModelSpec) and args.model.pooling == "mean"
    assert ServeArgs.model_validate(args.model_dump()).model == args.model  # as replicas get it
    assert ServeArgs.model_validate({"model": "minilm"}).model == "minilm"
    torch_encoder = load_encoder(args.model, "torch")
    assert torch_encoder.settings.pooling == "mean"
    with pytest.raises(ValueError, match="torch backend only"):
        load_encoder(args.model, "onnx")


def test_int8_weights_are_7_bit_so_no_x86_kernel_saturates(tiny_dir):
    """ORT's u8s8 kernels without VNNI (AVX2) saturate int16 pair sums on 8-bit weights: the export
    quantizes to 7 bits, and export.json names that recipe (a full-range export is redone)."""
    import json

    import onnx
    from onnx import numpy_helper

    from raylib.backends import INT8_RECIPE, export_onnx

    folder = export_onnx(tiny_dir)
    graph = onnx.load(str(folder / "model_int8.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # symmetric 7-bit range: |w| <= 64, so 2 x 255 x 64 = 32,640 fits int16 (8-bit: 65,025 does not)
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64
    assert json.loads((folder / "export.json").read_text())["int8"] == INT8_RECIPE
