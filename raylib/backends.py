"""Encoder backends behind one API: the torch `Encoder` and ONNX Runtime (fp32 and dynamic int8).

`load_encoder(model, backend)` returns a `raylib.encoding.BatchEncoder`: the torch
`raylib.model.Encoder` itself, or an `OnnxEncoder`. Both run the same encode loop
(`encode(texts, ...)` and its two halves `tokenize(texts, kind, max_length, padding=False)` and
`encode_features(input_ids, ...)`, so a server tokenizes a batch once and takes its token counts
from the same pass); a backend only supplies the forward pass of one padded batch.

The ONNX graphs are exported from the model directory by `export_onnx` into `<model>/onnx/`
(`model.onnx` fp32; `model_int8.onnx` dynamic int8 MatMul weights) and reused while the
model's weight files are unchanged. The graph holds the backbone, pooling and, where the model
has them, the sparse (ReLU(W_lex h)) and multi-vector (normalize(W_mul h)) heads; masking of
special tokens and cutting per text happen in the shared loop. No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from raylib.encoding import BatchEncoder
from raylib.registry import resolve_model_path

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
ONNX_DIR = "onnx"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
EXPORT_META = "export.json"
OPSET = 17
RECIPE = 3  # bump when the export or quantization recipe changes: exports are redone
# int8 MatMul weights in 7 bits (reduce_range): ONNX Runtime's u8s8 kernels on x86-64 CPUs without
# VNNI (AVX2, AVX-512 without VNNI) sum pairs of u8 x s8 products into int16 and saturate on 8-bit
# weights; 7-bit weights cannot. The same file then gives the same numbers on every x86-64 kernel
# (bench/int8_isa.py runs it on an emulated AVX2 CPU), so the cached export is valid on any node;
# export.json names the recipe so a full-range file from an older export is never reused.
INT8_RECIPE = {"weights": "s8", "per_channel": True, "reduce_range": True}


# ------------------------------------------------------------------------------- ONNX
def _fingerprint(path: Path) -> dict:
    """Sizes and mtimes of the weight files: a changed model re-exports."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (
        ".safetensors", ".bin", ".pt", ".json"))
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def export_onnx(name_or_path: str | os.PathLike, int8: bool = True, force: bool = False) -> Path:
    """Export `<model>/onnx/model.onnx` (+ `model_int8.onnx`) unless a current export is there;
    returns the onnx folder. Written to temp names and renamed, so concurrent exporters are safe."""
    path = resolve_model_path(name_or_path)
    out = path / ONNX_DIR
    meta = out / EXPORT_META
    want = {"fingerprint": _fingerprint(path), "opset": OPSET, "recipe": RECIPE, "int8": INT8_RECIPE}
    have = json.loads(meta.read_text()) if meta.exists() else None
    files = [ONNX_FILES["onnx"]] + ([ONNX_FILES["onnx-int8"]] if int8 else [])
    if not force and have == want and all((out / f).exists() for f in files):
        return out
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32 = Path(tmp) / ONNX_FILES["onnx"]
        _export_fp32(path, fp32)
        if int8:
            _quantize_int8(fp32, Path(tmp) / ONNX_FILES["onnx-int8"])
        for f in files:
            os.replace(Path(tmp) / f, out / f)
    meta.write_text(json.dumps(want, indent=1))
    return out


def _export_fp32(path: Path, target: Path) -> None:
    """Trace backbone + pooling + heads (eager attention: the exporter's most portable path)."""
    import torch

    from raylib.model import Encoder

    model = Encoder.from_pretrained(path, device="cpu", attn_implementation="eager").eval()

    class Graph(torch.nn.Module):
        def __init__(self, enc: Encoder):
            super().__init__()
            self.enc = enc

        def forward(self, input_ids, attention_mask):
            hidden = self.enc.backbone(input_ids=input_ids,
                                       attention_mask=attention_mask).last_hidden_state
            outs = [self.enc.pool(hidden, attention_mask)]
            if self.enc.sparse_linear is not None:
                outs.append(torch.relu(self.enc.sparse_linear(hidden)).squeeze(-1))
            if self.enc.colbert_linear is not None:
                vecs = self.enc.colbert_linear(hidden[:, 1:])
                vecs = vecs * attention_mask[:, 1:, None].to(vecs.dtype)
                outs.append(torch.nn.functional.normalize(vecs, dim=-1))
            return tuple(outs)

    names = ["dense"] + (["sparse"] if model.has_sparse else []) + (
        ["multivector"] if model.has_multivector else [])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "dense": {0: "batch"}, "sparse": {0: "batch", 1: "seq"},
            "multivector": {0: "batch", 1: "seq1"}}
    ids = model.tokenize(["an example text to trace", "two"], "document")
    with torch.no_grad(), warnings.catch_warnings():
        # tracer notes on transformers' mask helper (a shape check that is constant for
        # encoders) and on index ops (our indices are never negative)
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph(model), (ids["input_ids"], ids["attention_mask"]), str(target),
                          input_names=["input_ids", "attention_mask"], output_names=names,
                          dynamic_axes={k: v for k, v in axes.items()
                                        if k in names or k.startswith(("input", "attention"))},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _quantize_int8(fp32: Path, target: Path) -> None:
    """Dynamic int8: MatMul weights per channel, activations quantized per batch at run time.

    The FFN output projections of the first half of the layers stay fp32: their inputs (after
    GELU) have the widest ranges. On minilm / SciFact texts: min cosine to torch 0.986 -> 0.991,
    mean 0.994 -> 0.997, for 3.3x -> 2.7x torch's texts/s (bench/onnx_quality.py, README).
    Weights are 7-bit (INT8_RECIPE): safe on CPUs without VNNI."""
    import re

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ffn_out = {}
    for node in onnx.load(str(fp32), load_external_data=False).graph.node:
        found = re.search(r"layer\.(\d+)/output/dense/MatMul", node.name)
        if node.op_type == "MatMul" and found:
            ffn_out[node.name] = int(found.group(1))
    n_layers = max(ffn_out.values(), default=-1) + 1
    keep_fp32 = [name for name, layer in ffn_out.items() if layer < n_layers // 2]
    assert INT8_RECIPE["weights"] == "s8"
    quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8,
                     per_channel=INT8_RECIPE["per_channel"], reduce_range=INT8_RECIPE["reduce_range"],
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32)


class OnnxEncoder(BatchEncoder):
    """ONNX Runtime session over an exported graph (CPU; CUDA if onnxruntime-gpu is present)."""

    def __init__(self, name_or_path: str | os.PathLike, backend: str = "onnx",
                 threads: int | None = None):
        import onnxruntime as ort

        from raylib.model import TextTokenizer

        if backend not in ONNX_FILES:
            raise ValueError(f"ONNX backend must be one of {sorted(ONNX_FILES)}, got {backend!r}")
        path = resolve_model_path(name_or_path)
        folder = export_onnx(path, int8=backend == "onnx-int8")
        self.backend = backend
        self.text_tokenizer = TextTokenizer.from_pretrained(path)
        self.tokenizer, self.settings = self.text_tokenizer.tokenizer, self.text_tokenizer.settings
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(folder / ONNX_FILES[backend]), opts,
                                            providers=providers)
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.dim = int(outputs["dense"].shape[-1])
        self.has_sparse = "sparse" in outputs
        self.has_multivector = "multivector" in outputs
        self.multivector_dim = (int(outputs["multivector"].shape[-1])
                                if self.has_multivector else None)

    def tokenize(self, texts: Sequence[str], kind: str = "document",
                 max_length: int | None = None, padding: bool = False) -> dict[str, Any]:
        """Prefixed, truncated token ids per text (as Encoder.tokenize; unpadded lists only)."""
        if padding:
            raise ValueError("ONNX backends tokenize without padding (encode_features pads)")
        return self.text_tokenizer(texts, kind, max_length, padding=False)

    def _forward(self, input_ids, mask, dense, sparse, multivector, cls_flags):
        names = ["dense"] + (["sparse"] if sparse else []) + (["multivector"] if multivector else [])
        values = self.session.run(names, {"input_ids": input_ids, "attention_mask": mask})
        return dict(zip(names, values))


def load_encoder(name_or_path: "str | os.PathLike | ModelSpec", backend: str = "torch",
                 device: str | None = None, threads: int | None = None) -> BatchEncoder:
    """An encoder for `backend` in BACKENDS; `threads` sets intra-op threads (None: library
    default). ONNX backends export beside the model on first use."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        import torch

        from raylib.model import Encoder

        if threads:
            torch.set_num_threads(threads)
        return Encoder.from_pretrained(name_or_path, device=device)
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda for ONNX backends, got {device!r}")
    from raylib.model import ModelSpec

    spec = ModelSpec.of(name_or_path)
    if spec != ModelSpec(spec.name_or_path):
        raise ValueError(f"{backend}: a model spec's overrides (pooling, prefixes, trust_remote_code) "
                         f"are supported by the torch backend only; got {spec}")
    return OnnxEncoder(spec.name_or_path, backend, threads)
