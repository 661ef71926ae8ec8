"""Parity of our mining job with sentence-transformers' `mine_hard_negatives` on SciFact train.

  python bench/mine_parity_st.py [--data ../shared/data/scifact] [--k 50] [--n 10] [--ratio 0.95]

Ours: jobs/mine.py (Ray Data, BEIR input, minilm teacher, strategy topk_percpos, max_pos_ratio,
pos_reference min, candidates = K + max positives per query, too_few pad so partial sets survive).
Peer: mine_hard_negatives(relative_margin = 1 - ratio, range_max=K, num_negatives=N,
sampling_strategy="top", corpus=the SciFact corpus, use_faiss=True, output_format="triplet").
Prints the per-query agreement of the negative sets (the last line is JSON).

Semantics matched (read from sentence_transformers/util/hard_negatives.py, v6.2):
- ST retrieves range_max + max_positives candidates (max over all queries), masks every positive of
  the query (all dataset rows with the same query text), then cuts at
  min_pos - |min_pos| x margin where min_pos is the *lowest* positive score of the query, then
  keeps the top N: so ours runs with candidates = K + max_positives and pos_reference = min.
- ST deduplicates queries and the corpus by text (positives are added to the corpus); ours keys
  queries and documents by a hash of the text, so the same merging happens.
- ST's "triplet" output keeps queries with fewer than N survivors (fewer triplets); ours pads
  (repeats) them, so the sets compare equal; queries with none are empty on both sides.
- Prompts: minilm has none on either side; max_seq_length 256 on both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raylib.beir import document_text, load_beir  # noqa: E402


def run_st(data, k: int, n: int, ratio: float) -> tuple[dict[str, set], float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from raylib.model import resolve_model_path

    queries, docs = [], []
    for qid, rel in data.qrels.items():
        for did, grade in rel.items():
            if grade > 0 and qid in data.queries and did in data.corpus:
                queries.append(data.queries[qid])
                docs.append(document_text(data.corpus[did]))
    corpus = [document_text(d) for d in data.corpus.values()]
    model = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    start = time.time()
    mined = mine_hard_negatives(Dataset.from_dict({"query": queries, "answer": docs}), model,
                                corpus=corpus, relative_margin=round(1 - ratio, 10), range_max=k,
                                num_negatives=n, sampling_strategy="top", use_faiss=True,
                                output_format="triplet", output_scores=True, batch_size=64,
                                verbose=True)
    seconds = time.time() - start
    sets: dict[str, set] = {q: set() for q in queries}
    for row in mined:
        sets[row["query"]].add(row["negative"])
    return sets, seconds


def run_ours(data_dir: str, k: int, n: int, ratio: float, max_pos: int, out: Path) -> tuple[dict, dict]:
    from jobs.mine import main

    summary = main(["--config", str(ROOT / "jobs/configs/mine/debug.yaml"),
                    "--set", "input.kind=beir", "--set", f"input.path={data_dir}",
                    "--set", "input.split=train", "--set", "input.max_chars=null",
                    "--set", "teacher=minilm", "--set", f"candidates={k + max_pos}",
                    "--set", f"num_negatives={n}", "--set", "strategy=topk_percpos",
                    "--set", f"max_pos_ratio={ratio}", "--set", "pos_reference=min",
                    "--set", "too_few=pad", "--set", "max_docs_per_shard=2000",
                    "--set", "resources.embed_batch_size=64", "--set", f"output.path={out}"])
    sets: dict[str, set] = {}
    for row in pq.read_table(out, columns=["query", "negatives"]).to_pylist():
        sets.setdefault(row["query"], set()).update(row["negatives"])
    return sets, summary


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    p.add_argument("--k", type=int, default=50, help="ST range_max")
    p.add_argument("--n", type=int, default=10, help="num_negatives")
    p.add_argument("--ratio", type=float, default=0.95, help="max_pos_ratio = 1 - relative_margin")
    args = p.parse_args()
    data = load_beir(args.data, "train")
    max_pos = max(sum(1 for g in rel.values() if g > 0) for rel in data.qrels.values())
    print(f"SciFact train: {len(data.queries)} queries, {sum(len(r) for r in data.qrels.values())} "
          f"qrels, corpus {len(data.corpus)}, max positives per query {max_pos}", file=sys.stderr)

    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        ours, summary = run_ours(args.data, args.k, args.n, args.ratio, max_pos, Path(tmp) / "mined")
        ours_s = time.time() - start
    ray.shutdown()
    st, st_s = run_st(data, args.k, args.n, args.ratio)

    queries = sorted(set(st) | set(ours))
    same = [q for q in queries if st.get(q, set()) == ours.get(q, set())]
    jacc = [len(st.get(q, set()) & ours.get(q, set())) / max(1, len(st.get(q, set()) | ours.get(q, set())))
            for q in queries]
    diff = [q for q in queries if q not in set(same)]
    for q in diff[:10]:
        a, b = st.get(q, set()), ours.get(q, set())
        print(f"DIFF {q[:60]!r}: st {len(a)} ours {len(b)} common {len(a & b)}", file=sys.stderr)
    result = {"bench": "mine_parity_st", "queries": len(queries), "identical_sets": len(same),
              "agreement": round(len(same) / len(queries), 4), "mean_jaccard": round(float(np.mean(jacc)), 4),
              "negatives_ours": sum(len(v) for v in ours.values()),
              "negatives_st": sum(len(v) for v in st.values()),
              "k": args.k, "n": args.n, "max_pos_ratio": args.ratio, "candidates_ours": args.k + max_pos,
              "seconds_ours_job": round(ours_s, 1), "seconds_st": round(st_s, 1),
              "ours_counts": summary["counts"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
