"""GPU paths of the raylib core on one CUDA device: bf16 autocast + SDPA encode, gradient cache.

Needs only torch, transformers and numpy (no Ray, no FAISS), so it runs on a bare GPU image.
Random weights at two real shapes (speed does not depend on the weights):
  minilm:    BERT, 6 layers, 384 hidden, 12 heads (all-MiniLM-L6-v2's shape)
  me5-small: 12 layers, 384 hidden, 12 heads (multilingual-e5-small's encoder; Arctic §2.3 filter)
Prints, per shape:
  - encode texts/s: bf16 autocast + SDPA (the Encoder's GPU path) vs fp32 + eager attention on
    the same GPU (ratio), and the CPU figure of the same process for scale;
  - bf16 vs fp32 parity: min cosine of the embeddings and top-10 neighbour overlap;
  - gradient cache on CUDA (its RNG state per chunk): loss and gradients vs one big batch, bf16.
Run: python bench/gpu_paths.py [--texts 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from toolkit import emit

from raylib.gradcache import forward_backward
from raylib.losses.infonce import info_nce
from raylib.model import Encoder
from raylib.tiny import _WORDS, tiny_encoder

SHAPES = {"minilm": dict(num_layers=6), "me5-small": dict(num_layers=12)}


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Synthetic passages of 8-120 words (a spread of lengths, as in real pairs)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(8, 120))) for _ in range(n)]


def build(shape: str, attn: str, device: str) -> Encoder:
    enc = tiny_encoder("bert", hidden_size=384, num_heads=12, pooling="mean", max_length=256,
                       seed=0, **SHAPES[shape])
    if attn != "sdpa":
        enc.backbone.set_attn_implementation(attn)
    return enc.to(device)


def texts_per_s(enc: Encoder, texts: list[str], batch_size: int, fp32: bool = False,
                repeats: int = 3) -> tuple[float, np.ndarray]:
    """Best of `repeats` timed passes (the first also compiles kernels for each padded length)."""
    runs = [_timed_encode(enc, texts, batch_size, fp32) for _ in range(repeats)]
    return max(r[0] for r in runs), runs[-1][1]


def _timed_encode(enc: Encoder, texts: list[str], batch_size: int, fp32: bool) -> tuple[float, np.ndarray]:
    sync = torch.cuda.synchronize if next(enc.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    if fp32:  # the Encoder always autocasts on CUDA; fp32 baseline switches autocast off
        import raylib.model as M

        saved = M.autocast_for
        M.autocast_for = lambda device: torch.autocast("cuda", enabled=False)
        try:
            emb = enc.encode_dense(texts, batch_size=batch_size)
        finally:
            M.autocast_for = saved
    else:
        emb = enc.encode_dense(texts, batch_size=batch_size)
    sync()
    return len(texts) / (time.perf_counter() - start), emb


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 10, n_queries: int = 500) -> float:
    qa, qb = a[:n_queries], b[:n_queries]
    ta = np.argsort(-(qa @ a.T), axis=1)[:, 1:k + 1]
    tb = np.argsort(-(qb @ b.T), axis=1)[:, 1:k + 1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def gradcache_parity(shape: str, device: str, batch: int = 64, chunk: int = 16) -> dict:
    """bf16 autocast on CUDA: one big batch vs gradient cache in chunks; loss and grad cosine."""
    texts_q, texts_d = make_texts(batch, seed=1), make_texts(batch, seed=2)
    results = []
    for chunk_size in (None, chunk):
        enc = build(shape, "sdpa", device).train()
        feats = {"q": enc.tokenize(texts_q, "query"), "d": enc.tokenize(texts_d, "document")}
        feats = {s: {k: v.to(device) for k, v in f.items()} for s, f in feats.items()}

        def embed(side, f):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                return {"dense": enc(f["input_ids"], f["attention_mask"])["dense"]}

        def loss_fn(reps):
            q, d = reps["q"]["dense"].float(), reps["d"]["dense"].float()
            return info_nce(q, d, torch.arange(q.shape[0], device=q.device), 0.05), {}

        loss, _ = forward_backward(embed, feats, loss_fn, chunk_size, None, torch.device(device))
        grad = torch.cat([p.grad.flatten().float() for p in enc.parameters() if p.grad is not None])
        results.append((float(loss), grad))
    (l_full, g_full), (l_gc, g_gc) = results
    cos = float(torch.nn.functional.cosine_similarity(g_full.double(), g_gc.double(), dim=0))
    return {"loss_one_batch": l_full, "loss_grad_cache": l_gc, "grad_cosine": cos,
            "grad_rel_diff": float((g_full - g_gc).norm() / g_full.norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--cpu-texts", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this bench measures the GPU paths")
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    texts = make_texts(args.texts)
    for shape in SHAPES:
        sdpa = build(shape, "sdpa", "cuda")
        eager = build(shape, "eager", "cuda")
        tps_bf16, emb_bf16 = texts_per_s(sdpa, texts, args.batch_size)
        tps_fp32, emb_fp32 = texts_per_s(eager, texts, args.batch_size, fp32=True)
        cpu = build(shape, "sdpa", "cpu")
        tps_cpu, _ = texts_per_s(cpu, texts[:args.cpu_texts], 64, repeats=1)
        cos = np.sum(emb_bf16 * emb_fp32, axis=1)
        row = {"texts_per_s_bf16_sdpa": round(tps_bf16), "texts_per_s_fp32_eager": round(tps_fp32),
               "ratio_bf16_vs_fp32": round(tps_bf16 / tps_fp32, 2),
               "texts_per_s_cpu_this_host": round(tps_cpu, 1),
               "min_cosine_bf16_vs_fp32": float(cos.min()), "mean_cosine": float(cos.mean()),
               "top10_overlap_bf16_vs_fp32": topk_overlap(emb_bf16, emb_fp32),
               "gradcache_bf16": gradcache_parity(shape, "cuda")}
        out[shape] = row
        print(shape, json.dumps(row), flush=True)
    emit(__file__, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
