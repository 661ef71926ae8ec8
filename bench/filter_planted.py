"""Planted consistency check (issue 4): SciFact train pairs (query = claim, document = title + text
of a cited abstract) with 20% of the documents swapped to wrong queries, filtered by
jobs/filter.py with MiniLM, one shard holding all pairs, top_k 20.

  python bench/filter_planted.py [--data ../shared/data/scifact] [--top-k 20] [--swap 0.2]
  python bench/filter_planted.py --write-only runs/planted/input.jsonl   # the planted set as JSONL

Prints the kept % of true pairs (goal >= 90%) and the dropped % of swapped pairs (goal >= 95%);
the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from toolkit import ROOT, SHARED_DATA, emit

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")  # no 8 idle workers at start

from raylib.beir import document_text, load_beir


def planted_pairs(data_dir: str, swap: float, seed: int) -> list[dict]:
    """SciFact train qrels as pairs; a `swap` fraction gets another pair's (non-relevant) document."""
    import numpy as np

    data = load_beir(data_dir, "train")
    pairs = []
    for qid in sorted(data.qrels, key=lambda q: int(q) if q.isdigit() else q):
        for did, grade in sorted(data.qrels[qid].items()):
            if grade > 0 and did in data.corpus and qid in data.queries:
                pairs.append({"qid": qid, "did": did, "query": data.queries[qid],
                              "document": document_text(data.corpus[did])})
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=int(round(swap * len(pairs))), replace=False)
    docs = [(pairs[i]["did"], pairs[i]["document"]) for i in chosen]
    for _ in range(100):  # a permutation in which no pair gets one of its own relevant documents
        perm = rng.permutation(len(chosen))
        if all(docs[p][0] not in data.qrels[pairs[i]["qid"]] for i, p in zip(chosen, perm)):
            break
    else:
        raise RuntimeError("could not find a derangement of the swapped documents")
    swapped = {int(i): docs[p] for i, p in zip(chosen, perm)}
    out = []
    for i, p in enumerate(pairs):
        did, doc = swapped.get(i, (p["did"], p["document"]))
        out.append({"query": p["query"], "document": doc, "source": "scifact", "language": "en",
                    "qid": p["qid"], "did": did, "planted": "swapped" if i in swapped else "true"})
    return out


def write_jsonl(rows: list[dict], path: Path, bad_rows: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        if bad_rows:  # a few rejects so the debug run shows the rejects dataset
            f.write(b'{"query": null, "document": "x", "source": "scifact", "language": "en"}\n')
            f.write(b'{"query": "q", "document": "bad \xff bytes", "source": "scifact", "language": "en"}\n')
            f.write(b"not json\n")


def in_process(rows: list[dict], args) -> dict:
    """The same filter with the pure functions (heuristics, dedupe, consistency_ranks), no Ray."""
    import numpy as np
    import torch

    from raylib.filters import HeuristicConfig, consistency_ranks, document_keys, heuristic_reasons
    from raylib.model import Encoder

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    reasons = heuristic_reasons([r["query"] for r in rows], [r["document"] for r in rows], HeuristicConfig())
    keep = [r for r, why in zip(rows, reasons) if why is None]
    enc = Encoder.from_pretrained(args.model, device="cpu")
    q = enc.encode_dense([r["query"] for r in keep], "query", max_length=32)
    d = enc.encode_dense([r["document"] for r in keep], "document", max_length=256)
    ranks = consistency_ranks(q, d, document_keys([r["document"] for r in keep]), args.top_k)
    kept = [r["planted"] for r, k in zip(keep, ranks) if k <= args.top_k]
    n_true = sum(r["planted"] == "true" for r in rows)
    n_swapped = len(rows) - n_true
    result = {"mode": "in-process (no Ray)", "pairs": len(rows),
              "kept_true_pct": round(100 * kept.count("true") / n_true, 2),
              "dropped_swapped_pct": round(100 * (n_swapped - kept.count("swapped")) / n_swapped, 2),
              "median_rank_true": float(np.median([k for r, k in zip(keep, ranks) if r["planted"] == "true"])),
              "seconds": round(time.perf_counter() - start, 1)}
    emit(__file__, result)
    return result


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED_DATA / "scifact"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--swap", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads per embedding actor")
    p.add_argument("--workdir", default=None)
    p.add_argument("--write-only", metavar="PATH", help="only write the planted JSONL (+3 bad rows)")
    p.add_argument("--no-ray", action="store_true",
                   help="same check with raylib.filters in this process (no Ray): a reference")
    args = p.parse_args()

    rows = planted_pairs(args.data, args.swap, args.seed)
    if args.write_only:
        write_jsonl(rows, Path(args.write_only), bad_rows=True)
        emit(__file__, {"written": str(args.write_only), "pairs": len(rows)})
        return {}

    if args.no_ray:
        return in_process(rows, args)

    from raylib.jobs.filter import FilterConfig, run
    from raylib.config import load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="filter_planted_"))
    write_jsonl(rows, work / "input.jsonl")
    cfg = load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", [
        f"input={work / 'input.jsonl'}", f"output={work / 'filter'}",
        f"model={args.model}", f"shard_size={len(rows)}", f"top_k={args.top_k}",
        f"concurrency={args.concurrency}", f"num_threads_per_actor={args.threads}",
        "document_max_tokens=256", "read_blocks=1"])
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start

    import pyarrow.dataset as pads

    kept = pads.dataset(summary["outputs"]["kept"], format="parquet").to_table(columns=["planted"]).column(0).to_pylist()
    n_true = sum(r["planted"] == "true" for r in rows)
    n_swapped = len(rows) - n_true
    kept_true = kept.count("true")
    kept_swapped = kept.count("swapped")
    result = {
        "pairs": len(rows), "true_pairs": n_true, "swapped_pairs": n_swapped,
        "kept_true_pct": round(100 * kept_true / n_true, 2),
        "dropped_swapped_pct": round(100 * (n_swapped - kept_swapped) / n_swapped, 2),
        "goals": {"kept_true_pct": ">= 90", "dropped_swapped_pct": ">= 95"},
        "shards": summary["shards"], "top_k": args.top_k, "model": args.model,
        "dropped_by_heuristic": summary["dropped_by_heuristic"],
        "dropped_by_consistency": summary["dropped_by_consistency"], "kept": summary["kept"],
        "seconds": round(seconds, 1), "workdir": str(work),
    }
    print(f"kept {kept_true}/{n_true} true pairs = {result['kept_true_pct']}% (goal >= 90%)")
    print(f"dropped {n_swapped - kept_swapped}/{n_swapped} swapped pairs = "
          f"{result['dropped_swapped_pct']}% (goal >= 95%)")
    emit(__file__, result)
    return result


if __name__ == "__main__":
    main()
