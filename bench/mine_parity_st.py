"""Parity of our mining job with sentence-transformers' `mine_hard_negatives` on SciFact train.

  python bench/mine_parity_st.py [--k 50] [--n 10] [--ratio 0.95] [--corpus-limit M] [--max-length L]
  python bench/mine_parity_st.py --job      # end to end: our Ray job vs ST embedding on its own

Default mode (shared embeddings): minilm embeds the queries and corpus once (raylib Encoder, the
same vectors sentence-transformers computes: checked to 6e-8 on the tiny model in
tests/test_mining.py); they are written into ST's own `cache_folder` format, so ST's
mine_hard_negatives runs its unchanged selection code on them, and ours runs the code the job's
actors run (KeyedIndex shards of 2000 docs, merge_topk, select_negatives). `--job` instead runs
jobs/mine.py on Ray (BEIR input) and lets ST embed by itself (2 full minilm passes over the corpus:
about an hour of CPU on 2 cores). `--corpus-limit M` keeps every train positive plus the first M
other documents; `--max-length` truncates on both sides.
Ours: strategy topk_percpos, max_pos_ratio, pos_reference min, candidates = K + max positives + 1 per
query, too_few pad (so partial sets survive). Peer: mine_hard_negatives(relative_margin = 1 - ratio,
range_max=K, num_negatives=N, sampling_strategy="top", corpus=..., use_faiss=True,
output_format="triplet"). Prints the per-query agreement of the negative sets (last line JSON).

Semantics matched (read from sentence_transformers/util/hard_negatives.py, v6.3.0, the locked
version; the JSON names the installed one):
- ST retrieves range_max + max_positives + 1 candidates (max over all queries), masks every
  positive of the query (all dataset rows with the same query text) and a corpus document whose
  text equals the query, then cuts at min_pos - |min_pos| x margin where min_pos is the *lowest*
  positive score of the query, then keeps the top N: so ours runs with candidates =
  K + max_positives + 1 and pos_reference = min, and select_negatives drops the query's own text.
- ST deduplicates queries and the corpus by text (positives are added to the corpus); ours keys
  queries and documents by a hash of the text, so the same merging happens.
- ST's "triplet" output keeps queries with fewer than N survivors (fewer triplets); ours pads
  (repeats) them, so the sets compare equal; queries with none are empty on both sides.
- Prompts: minilm has none on either side; max_seq_length 256 on both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow.parquet as pq
from toolkit import ROOT, SHARED_DATA, emit

from raylib.beir import document_text, load_beir


def run_st(data, k: int, n: int, ratio: float) -> tuple[dict[str, set], float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from raylib.registry import resolve_model_path

    queries, docs = pairs_of(data)
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
    from raylib.jobs.mine import main

    summary = main(["--config", str(ROOT / "jobs/configs/mine/debug.yaml"),
                    "--set", "input.kind=beir", "--set", f"input.path={data_dir}",
                    "--set", "input.split=train", "--set", "input.max_chars=null",
                    "--set", "teacher=minilm", "--set", f"candidates={k + max_pos + 1}",
                    "--set", f"num_negatives={n}", "--set", "strategy=topk_percpos",
                    "--set", f"max_pos_ratio={ratio}", "--set", "pos_reference=min",
                    "--set", "too_few=pad", "--set", "max_docs_per_shard=2000",
                    "--set", "resources.embed_batch_size=64", "--set", f"output={out}"])
    sets: dict[str, set] = {}
    for row in pq.read_table(summary["outputs"]["mined"], columns=["query", "negatives"]).to_pylist():
        sets.setdefault(row["query"], set()).update(row["negatives"])
    return sets, summary


def pairs_of(data) -> tuple[list[str], list[str]]:
    """(query texts, positive document texts) of every positive qrel, one entry per pair."""
    queries, docs = [], []
    for qid, rel in data.qrels.items():
        for did, grade in rel.items():
            if grade > 0 and qid in data.queries and did in data.corpus:
                queries.append(data.queries[qid])
                docs.append(document_text(data.corpus[did]))
    return queries, docs


def shared_embeddings(data, k: int, n: int, ratio: float, max_pos: int, max_length: int | None,
                      cache: Path) -> tuple[dict, dict, float]:
    """Embed once; run ST's selection (via its cache_folder) and ours on the same vectors."""
    import hashlib

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from raylib import mining as M
    from raylib.model import Encoder
    from raylib.registry import resolve_model_path

    torch.set_num_threads(2)
    queries, docs = pairs_of(data)
    corpus = [document_text(d) for d in data.corpus.values()]
    st_corpus = list(dict.fromkeys(corpus + docs))          # ST: corpus + positives, deduplicated
    st_queries = list(dict.fromkeys(queries))
    st = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    if max_length:
        st.max_seq_length = max_length
    enc = Encoder.from_pretrained("minilm")
    start = time.time()
    d_emb = enc.encode_dense(st_corpus, "document", batch_size=64, max_length=max_length, show_progress=True)
    q_emb = enc.encode_dense(st_queries, "query", batch_size=64, max_length=max_length)
    embed_s = time.time() - start
    name = st.model_card_data.base_model or ""
    for texts, emb, kind in ((st_queries, q_emb, "query"), (st_corpus, d_emb, "corpus")):
        h = hashlib.sha256(repr((name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()
        np.save(cache / f"{kind}_embeddings_{h}.npy", emb)
    mined = mine_hard_negatives(Dataset.from_dict({"query": queries, "answer": docs}), st, corpus=corpus,
                                relative_margin=round(1 - ratio, 10), range_max=k, num_negatives=n,
                                sampling_strategy="top", use_faiss=True, output_format="triplet",
                                cache_folder=str(cache), verbose=True)
    st_sets: dict[str, set] = {q: set() for q in st_queries}
    for row in mined:
        st_sets[row["query"]].add(row["negative"])

    pos_of: dict[str, list[str]] = {q: [] for q in st_queries}
    for q, d in zip(queries, docs):
        pos_of[q].append(d)
    rule = M.NegativeRule(num_negatives=n, max_pos_ratio=ratio, too_few="pad", pos_reference="min")
    d_keys = M.text_keys(st_corpus)
    sel, _, _ = M.mine_in_memory(q_emb, M.text_keys(st_queries), M.text_keys([pos_of[q][0] for q in st_queries]),
                                 [M.text_keys(pos_of[q]) for q in st_queries], d_emb, d_keys, rule,
                                 candidates=k + max_pos + 1, max_docs_per_shard=2000)
    text_of = dict(zip(d_keys.tolist(), st_corpus))
    ours = {q: {text_of[x] for x in sel.neg_ids[i] if x >= 0} for i, q in enumerate(st_queries)}
    return st_sets, ours, embed_s


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED_DATA / "scifact"))
    p.add_argument("--k", type=int, default=50, help="ST range_max")
    p.add_argument("--n", type=int, default=10, help="num_negatives")
    p.add_argument("--ratio", type=float, default=0.95, help="max_pos_ratio = 1 - relative_margin")
    p.add_argument("--corpus-limit", type=int, default=None, help="train positives + this many other docs (default mode only)")
    p.add_argument("--max-length", type=int, default=None, help="teacher max tokens (both sides)")
    p.add_argument("--job", action="store_true", help="end to end: Ray job vs ST embedding by itself")
    args = p.parse_args()
    data = load_beir(args.data, "train")
    if args.corpus_limit is not None:
        keep = {d for rel in data.qrels.values() for d, g in rel.items() if g > 0}
        others = [d for d in data.corpus if d not in keep][:args.corpus_limit]
        data.corpus = {d: v for d, v in data.corpus.items() if d in keep or d in set(others)}
    max_pos = max(sum(1 for g in rel.values() if g > 0) for rel in data.qrels.values())
    print(f"SciFact train: {len(data.queries)} queries, {sum(len(r) for r in data.qrels.values())} "
          f"qrels, corpus {len(data.corpus)}, max positives per query {max_pos}", file=sys.stderr)
    timing: dict = {}
    summary = None
    if args.job:
        import ray

        from raylib.ray_env import init_data_ray

        init_data_ray(8, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            ours, summary = run_ours(args.data, args.k, args.n, args.ratio, max_pos, Path(tmp) / "mined")
            timing["seconds_ours_job"] = round(time.time() - start, 1)
        ray.shutdown()
        st, timing["seconds_st"] = run_st(data, args.k, args.n, args.ratio)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            st, ours, timing["seconds_embedding"] = shared_embeddings(
                data, args.k, args.n, args.ratio, max_pos, args.max_length, Path(tmp))

    queries = sorted(set(st) | set(ours))
    same = [q for q in queries if st.get(q, set()) == ours.get(q, set())]
    jacc = [len(st.get(q, set()) & ours.get(q, set())) / len(st.get(q, set()) | ours.get(q, set()))
            if st.get(q) or ours.get(q) else 1.0 for q in queries]
    diff = [q for q in queries if q not in set(same)]
    for q in diff[:10]:
        a, b = st.get(q, set()), ours.get(q, set())
        print(f"DIFF {q[:60]!r}: st {len(a)} ours {len(b)} common {len(a & b)}", file=sys.stderr)
    result = {"mode": "job" if args.job else "shared_embeddings",
              "queries": len(queries), "corpus": len(data.corpus), "identical_sets": len(same),
              "agreement": round(len(same) / len(queries), 4), "mean_jaccard": round(float(np.mean(jacc)), 4),
              "negatives_ours": sum(len(v) for v in ours.values()),
              "negatives_st": sum(len(v) for v in st.values()),
              "queries_with_no_negative": sum(1 for q in queries if not ours.get(q)),
              "k": args.k, "n": args.n, "max_pos_ratio": args.ratio, "candidates_ours": args.k + max_pos + 1,
              "sentence_transformers": __import__("sentence_transformers").__version__,
              "max_length": args.max_length, **{k: round(v, 1) for k, v in timing.items()},
              "ours_counts": summary["counts"] if summary else None}
    emit(__file__, result)
    return result


if __name__ == "__main__":
    main()
