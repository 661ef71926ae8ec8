"""onnx-int8 on CPUs without VNNI: the same export run on this CPU and on an emulated AVX2 one.

    python bench/int8_isa.py [--model minilm] [--texts 200] [--cpu Haswell] [--qemu qemu-x86_64]

ONNX Runtime picks its int8 MatMul kernel from the CPU: with AVX512-VNNI / AVX-VNNI it sums u8 x s8
products in int32; with plain AVX2 (and AVX-512 without VNNI) it sums pairs into int16 first, which
saturates on 8-bit weights. The export's 7-bit weights (raylib.backends.INT8_RECIPE) cannot.
This bench runs the exported fp32 and int8 graphs on one padded batch of SciFact texts (test
queries, then corpus documents) here and in a child process under QEMU's user-mode emulator with
`-cpu Haswell` (AVX2, FMA; no AVX-512, no VNNI: ONNX Runtime reads the emulated CPUID), for minilm
and a tiny random BGE-M3 model (dense + sparse heads); it prints each side's int8 error to the fp32
graph (equal to torch within 1e-4, tests/test_backends.py) and the largest difference between
the two CPUs' int8 outputs. qemu-user is a Debian package (`apt-get install qemu-user`). Emulated speed means
nothing: only the numbers are compared. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from toolkit import SHARED_DATA, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_graphs(folder: str, batch: str, out: str) -> None:
    """The fp32 and int8 graphs on one padded batch (token ids made by the parent), raw outputs to
    `out`. Only ONNX Runtime runs here: QEMU 7.2 mis-emulates numpy's AVX2 argsort (a wrong
    permutation on an emulated Haswell), so the parent does all the numpy work."""
    import onnxruntime as ort

    inputs = dict(np.load(batch))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    got = {}
    for name in ("model.onnx", "model_int8.onnx"):
        session = ort.InferenceSession(str(Path(folder) / name), opts, providers=["CPUExecutionProvider"])
        for o, value in zip(session.get_outputs(), session.run(None, inputs)):
            got[f"{name}:{o.name}"] = value
    np.savez(out, **got)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx_vnni", "avx2")))


def compare(model: str, texts: list[str], qemu: str, cpu: str, tmp: Path) -> dict:
    """int8 vs fp32 graph on this CPU and on the emulated one, and int8 between the two CPUs."""
    from raylib.model import Encoder
    from raylib.backends import export_onnx

    folder = export_onnx(model)  # made here, used by both sides
    ids = Encoder.from_pretrained(model, device="cpu").tokenize(texts, "document")
    np.savez(tmp / "batch.npz", input_ids=ids["input_ids"].numpy(), attention_mask=ids["attention_mask"].numpy())
    for side, prefix in (("here", []), ("emulated", [qemu, "-cpu", cpu])):
        subprocess.run(prefix + [sys.executable, __file__, "--child", str(folder), str(tmp / "batch.npz"),
                                 str(tmp / f"{side}.npz")], check=True, stderr=subprocess.DEVNULL)
    sides = {side: np.load(tmp / f"{side}.npz") for side in ("here", "emulated")}
    out: dict = {}
    for head in ("dense", "sparse"):
        if f"model.onnx:{head}" not in sides["here"]:
            continue
        ref = sides["here"][f"model.onnx:{head}"]
        if head == "dense":  # cosine of the pooled vectors to the fp32 graph's (= torch within 1e-4)
            unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
            out["dense_cos_to_fp32_min"] = {s: round(float((unit(z[f"model_int8.onnx:{head}"]) * unit(ref))
                                                           .sum(1).min()), 5) for s, z in sides.items()}
        else:  # per-token lexical weights
            mask = ids["attention_mask"].numpy().astype(bool)
            out["sparse_max_err_to_fp32"] = {s: round(float(np.abs(z[f"model_int8.onnx:{head}"] - ref)[mask].max()), 5)
                                             for s, z in sides.items()}
        out[f"{head}_int8_max_abs_diff_between_cpus"] = float(np.abs(
            sides["here"][f"model_int8.onnx:{head}"] - sides["emulated"][f"model_int8.onnx:{head}"]).max())
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--cpu", default="Haswell", help="QEMU CPU model: AVX2 without AVX-512/VNNI")
    p.add_argument("--qemu", default="qemu-x86_64")
    p.add_argument("--child", nargs=3, metavar=("FOLDER", "BATCH", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_graphs(*args.child)
        return {}
    qemu = shutil.which(args.qemu)
    if qemu is None:
        raise SystemExit(f"{args.qemu} not found on PATH: apt-get install qemu-user, or pass --qemu")
    from raylib.beir import load_beir
    from raylib.backends import INT8_RECIPE
    from raylib.tiny import save_tiny_encoder

    data = load_beir(SHARED_DATA / "scifact", split="test")
    texts = (list(data.queries.values()) + data.doc_texts())[:args.texts]
    result = {"host_cpu_flags": cpu_flags(), "emulated_cpu": args.cpu,
              "int8_recipe": INT8_RECIPE, "texts": len(texts)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result[args.model] = compare(args.model, texts, qemu, args.cpu, tmp)
        tiny = save_tiny_encoder(tmp / "tiny_m3", m3_heads=True)
        result["tiny_m3"] = compare(str(tiny), texts, qemu, args.cpu, tmp)
    emit(__file__, result)
    return result


if __name__ == "__main__":
    main()
