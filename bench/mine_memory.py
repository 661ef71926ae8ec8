"""Peak memory of the mining job as the corpus grows (synthetic corpus, tiny teacher).

  python bench/mine_memory.py [--sizes 100000,300000,1000000] [--queries 2000] [--shard 100000]

Each size runs in a fresh process with its own local Ray: a synthetic corpus of N short documents
(Parquet) plus `--queries` pairs, mined by jobs/mine.py with a tiny random mean-pooled model and
max_docs_per_shard=`--shard`. A sampler reads every process of that Ray (driver, raylet, workers,
actors) twice a second and keeps, per role, the peak RSS and the peak private memory (RSS minus
shared pages, i.e. without the mapped object store) of the largest process, and the peak of the
summed PSS. Baseline in the same run: the bytes a full [queries x corpus] float32 score matrix
would take (what mining without top-K streaming holds), and the corpus embeddings themselves.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from toolkit import ROOT, MemorySampler, emit, report_to_parent, run_per_size

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MB = 1 << 20
WORDS = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar", "en", "ol")]


def role(proc) -> str:
    """Driver, ShardActor, MineBatch, EmbedActor, other Ray worker, or a Ray system process."""
    try:
        if proc.pid == os.getpid():
            return "driver"
        name = " ".join(proc.cmdline()[:1]) or proc.name()
    except Exception:
        return "gone"
    for key in ("ShardActor", "MineBatch", "EmbedActor"):
        if key in name:
            return key
    if name.startswith("ray::"):
        return "ray_worker"
    return "ray_system"


def make_data(root: Path, n_docs: int, n_queries: int, seed: int = 0) -> tuple[Path, Path]:
    """Corpus Parquet of n_docs synthetic texts (written in chunks) and pairs JSONL."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    corpus = root / "corpus.parquet"
    writer = None
    first_docs = None
    for start in range(0, n_docs, 100_000):
        m = min(100_000, n_docs - start)
        idx = rng.integers(0, len(words), size=(m, 8))
        docs = [" ".join(row) for row in words[idx]]
        if first_docs is None:
            first_docs = docs[:n_queries]
        table = pa.table({"document": docs, "id": [f"d{start + i}" for i in range(m)]})
        writer = writer or pq.ParquetWriter(corpus, table.schema)
        writer.write_table(table)
    writer.close()
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i, d in enumerate(first_docs):
            f.write(json.dumps({"query": " ".join(d.split()[:3]), "document": d, "source": "syn",
                                "language": "en", "id": f"p{i}"}) + "\n")
    return corpus, pairs


def one(n_docs: int, n_queries: int, shard: int, dim: int) -> dict:
    import ray

    from raylib.jobs.mine import main
    from raylib.ray_env import init_data_ray
    from raylib.tiny import save_tiny_encoder

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model = save_tiny_encoder(tmp / "tiny", pooling="mean", hidden_size=dim)
        t0 = time.time()
        corpus, pairs = make_data(tmp, n_docs, n_queries)
        gen_s = time.time() - t0
        init_data_ray(8, log_to_driver=False, object_store_memory=2 * 1024 * MB)
        # every process of this Ray, twice a second; private = RSS minus the mapped object store
        with MemorySampler(500, children=True, label=role, pss=True) as sampler:
            t0 = time.time()
            summary = main(["--config", str(ROOT / "jobs/configs/mine/debug.yaml"),
                            "--set", f"teacher={model}", "--set", f"input.path={pairs}",
                            "--set", f"input.corpus={corpus}", "--set", f"max_docs_per_shard={shard}",
                            "--set", "candidates=50", "--set", "num_negatives=10",
                            "--set", "strategy=topk_abs", "--set", "max_score=0.9999",
                            "--set", "too_few=pad",
                            "--set", "resources.embed_batch_size=256",
                            "--set", "resources.corpus_batch_size=8192",
                            "--set", f"output={tmp / 'mine'}"])
            run_s = time.time() - t0
        ray.shutdown()
    return {"docs": n_docs, "queries": n_queries, "shards": summary["corpus"]["shards"],
            "max_docs_in_a_shard": summary["corpus"]["max_docs_in_a_shard"],
            "kept": summary["counts"]["kept"], "seconds": round(run_s, 1), "gen_seconds": round(gen_s, 1),
            "peak_rss_mb": {k: round(v / MB) for k, v in sorted(sampler.by_label("rss").items())},
            "peak_private_mb": {k: round(v / MB) for k, v in sorted(sampler.by_label("private").items())},
            "peak_pss_total_mb": round(sampler.total_peak / MB),
            "corpus_embeddings_mb": round(n_docs * dim * 4 / MB),
            "full_score_matrix_mb": round(n_queries * n_docs * 4 / MB)}


def print_row(n: int, row: dict) -> None:
    """One size's line (nothing for a failed size: its stderr tail is already printed)."""
    if "error" not in row:
        print(f"{n:>9} docs: {row['shards']} shards, {row['seconds']} s, peak RSS MB "
              f"{row['peak_rss_mb']}, private MB {row['peak_private_mb']}, total PSS {row['peak_pss_total_mb']} MB "
              f"(a full score matrix would be {row['full_score_matrix_mb']} MB)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--shard", type=int, default=100_000, help="max_docs_per_shard")
    p.add_argument("--dim", type=int, default=32, help="tiny model hidden size")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        report_to_parent(one(args.one, args.queries, args.shard, args.dim))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = run_per_size(__file__, sizes, ["--queries", args.queries, "--shard", args.shard, "--dim", args.dim],
                        flag="--one", keep_going=True, each=print_row)
    emit(__file__, {"rows": [{"docs": n, **r} if "error" in r else r for n, r in zip(sizes, rows)]})


if __name__ == "__main__":
    main()
