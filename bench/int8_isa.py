"""onnx-int8 on CPUs without VNNI: the same export run on this CPU and on an emulated AVX2 one.

    python bench/int8_isa.py [--model minilm] [--texts 200] [--cpu Haswell] [--qemu qemu-x86_64]

ONNX Runtime picks its int8 MatMul kernel from the CPU: with AVX512-VNNI / AVX-VNNI it sums u8 x s8
products in int32; with plain AVX2 (and AVX-512 without VNNI) it sums pairs into int16 first, which
saturates on 8-bit weights. The export's 7-bit weights (raylib.onnx_backend.INT8_RECIPE) cannot.
This bench encodes SciFact texts (test queries, then corpus documents) with onnx-int8 here and in a
child process under QEMU's user-mode emulator with `-cpu Haswell` (AVX2, FMA; no AVX-512, no VNNI:
ONNX Runtime reads the emulated CPUID), and a tiny random BGE-M3 model's dense + sparse heads the
same way; it prints each side's cosine / sparse error to torch and the largest difference between
the two CPUs. qemu-user is a Debian package (`apt-get install qemu-user`). Emulated speed means
nothing: only the numbers are compared. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "scifact"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def encode_int8(model: str, texts: list[str], out: Path) -> None:
    """onnx-int8 dense (+ per-token sparse weights where the model has them) into out (.npz)."""
    from raylib.onnx_backend import load_encoder

    enc = load_encoder(model, "onnx-int8", threads=1)
    got = enc.encode(texts, kind="document", sparse=enc.has_sparse, batch_size=16)
    sparse = [np.array(sorted(d.items()), np.float64).reshape(-1, 2) for d in got.get("sparse", [])]
    np.savez(out, dense=got["dense"], **{f"sparse{i}": s for i, s in enumerate(sparse)})


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx_vnni", "avx2")))


def compare(model: str, texts: list[str], qemu: str, cpu: str, tmp: Path) -> dict:
    """Torch reference, int8 here, int8 under the emulated CPU."""
    from raylib.model import Encoder
    from raylib.onnx_backend import export_onnx

    export_onnx(model)  # made here, used by both sides
    ref = Encoder.from_pretrained(model, device="cpu").encode(texts, kind="document", sparse=True
                                                               if "tiny" in str(model) else False)
    here, emulated = tmp / "here.npz", tmp / "emulated.npz"
    encode_int8(model, texts, here)
    cmd = [qemu, "-cpu", cpu, sys.executable, __file__, "--child", str(model), str(emulated),
           "--texts-file", str(tmp / "texts.json")]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    a, b = np.load(here), np.load(emulated)
    out = {"cos_to_torch_min": {"here": float((a["dense"] * ref["dense"]).sum(1).min()),
                                "emulated": float((b["dense"] * ref["dense"]).sum(1).min())},
           "dense_max_abs_diff_between_cpus": float(np.abs(a["dense"] - b["dense"]).max())}
    if "sparse" in ref:
        def err(z):
            return max(abs(dict(map(tuple, z[f"sparse{i}"])).get(k, 0.0) - ref["sparse"][i].get(k, 0.0))
                       for i in range(len(texts)) for k in set(ref["sparse"][i]) | set(z[f"sparse{i}"][:, 0]))
        out["sparse_max_err_to_torch"] = {"here": err(a), "emulated": err(b)}
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--cpu", default="Haswell", help="QEMU CPU model: AVX2 without AVX-512/VNNI")
    p.add_argument("--qemu", default="qemu-x86_64")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--texts-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        encode_int8(args.child[0], json.loads(Path(args.texts_file).read_text()), Path(args.child[1]))
        return {}
    qemu = shutil.which(args.qemu)
    if qemu is None:
        raise SystemExit(f"{args.qemu} not found on PATH: apt-get install qemu-user, or pass --qemu")
    from raylib.beir import load_beir
    from raylib.onnx_backend import INT8_RECIPE
    from raylib.tiny import save_tiny_encoder

    data = load_beir(DATA, split="test")
    texts = (list(data.queries.values()) + data.doc_texts())[:args.texts]
    result = {"bench": "int8_isa", "host_cpu_flags": cpu_flags(), "emulated_cpu": args.cpu,
              "int8_recipe": INT8_RECIPE, "texts": len(texts)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "texts.json").write_text(json.dumps(texts))
        result[args.model] = compare(args.model, texts, qemu, args.cpu, tmp)
        tiny = save_tiny_encoder(tmp / "tiny_m3", m3_heads=True)
        (tmp / "texts.json").write_text(json.dumps(texts[:40]))
        result["tiny_m3"] = compare(str(tiny), texts[:40], qemu, args.cpu, tmp)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
