"""Scale benchmark for jobs/filter.py with a tiny model: pairs/s and peak memory per Ray worker
as the data set grows (shard_size fixed, so the number of shards grows), and the encode stage's
throughput against a bare single-process Encoder.encode loop on the same data and cores (both
timed from the model on disk to the last embedding: the Ray side includes actor start-up).

  python bench/filter_scale.py --sizes 100000,300000 [--shard-size 50000] [--encode-pairs 20000]
  python bench/filter_scale.py --sizes 100000,1000000          # the issue's 100k -> 1M check
  python bench/filter_scale.py --sizes '' --encode-pairs 300000  # encode comparison only

Peak memory is sampled every 0.5 s over every worker process of the local Ray started here
(RSS and RSS minus shared pages, which excludes the mapped object store). Goal: flat per-worker
peak from the smallest to the largest size; encode ratio >= 0.9. Last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")  # no 8 idle workers at start

WORDS = """the of and to in is was for on that with as by it from at are be this which or an has
water protein cell cells gene genes cancer patients disease study results data model models method
query document search retrieval embedding text language python function returns list string
number value file error class object module red green blue cat dog house car tree river mountain
music film book war king city state world year time new first""".split()


def make_pairs(n: int, out_dir: Path, seed: int, rows_per_file: int = 50_000) -> list[Path]:
    """n synthetic pairs (documents of 20-60 words, queries = words from the document + noise)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, n, rows_per_file):
        m = min(rows_per_file, n - start)
        docs, queries = [], []
        for i in range(m):
            d = words[rng.integers(0, len(words), size=rng.integers(20, 60))]
            q = np.concatenate([rng.choice(d, size=4), words[rng.integers(0, len(words), size=3)]])
            docs.append(f"doc {start + i} " + " ".join(d))
            queries.append(" ".join(q) + f" {start + i}")
        src = ["synthetic"] * m
        lang = ["en"] * m
        path = out_dir / f"part-{start // rows_per_file:05d}.parquet"
        pq.write_table(pa.table({"query": queries, "document": docs, "source": src, "language": lang}), path)
        files.append(path)
    return files


class WorkerMemory:
    """Samples RSS of every process under this session's raylet (the Ray workers)."""

    def __init__(self, interval: float = 0.5):
        import psutil
        import ray

        node = ray._private.worker._global_node
        self.raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        self.interval, self.peak, self.peak_uss_like = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                children = self.raylet.children(recursive=True)
            except psutil.Error:
                children = []
            for proc in children:
                try:
                    title = " ".join(proc.cmdline())[:60]
                    mem = proc.memory_info()
                except psutil.Error:
                    continue
                if not title.startswith("ray::"):
                    continue
                private = mem.rss - getattr(mem, "shared", 0)
                if mem.rss > self.peak.get(proc.pid, (0, ""))[0]:
                    self.peak[proc.pid] = (mem.rss, title)
                if private > self.peak_uss_like.get(proc.pid, (0, ""))[0]:
                    self.peak_uss_like[proc.pid] = (private, title)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        mib = 1 << 20
        rss = max(self.peak.values(), default=(0, ""))
        private = max(self.peak_uss_like.values(), default=(0, ""))
        return {"peak_worker_rss_mib": round(rss[0] / mib, 1), "peak_rss_worker": rss[1],
                "peak_worker_private_mib": round(private[0] / mib, 1), "peak_private_worker": private[1],
                "workers_seen": len(self.peak), "peak_private_mib_by_stage": self.by_stage()}

    def by_stage(self) -> dict[str, float]:
        """Peak private MiB per worker kind (the process title at its peak, e.g. the embed actor)."""
        out: dict[str, float] = {}
        for size, title in self.peak_uss_like.values():
            name = title.removeprefix("ray::").strip()[:40]
            out[name] = max(out.get(name, 0.0), round(size / (1 << 20), 1))
        return dict(sorted(out.items(), key=lambda kv: -kv[1])[:6])


def encode_comparison(files: list[Path], model: str, pairs: int, threads: int, batch_size: int,
                      rows_per_call: int) -> dict:
    """Bare in-process Encoder.encode over `pairs` pairs vs the Ray Data embedding stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from raylib.model import Encoder
    from raylib.ray_data.consistency import CurationStats
    from raylib.ray_data.embed import embed

    table = pa.concat_tables([pq.read_table(f) for f in files]).slice(0, pairs)
    queries = table.column("query").to_pylist()
    docs = table.column("document").to_pylist()
    torch.set_num_threads(threads)
    start = time.perf_counter()  # both sides: from the model on disk to all embeddings
    enc = Encoder.from_pretrained(model, device="cpu")
    for s in range(0, len(queries), rows_per_call):  # same call sizes as the actor gets
        enc.encode_dense(queries[s:s + rows_per_call], "query", batch_size=batch_size, max_length=32)
        enc.encode_dense(docs[s:s + rows_per_call], "document", batch_size=batch_size, max_length=128)
    bare = time.perf_counter() - start
    del enc

    stats = CurationStats.remote()
    ds = ray.data.from_arrow(table)
    ds = embed(ds, model, "query", "query", "_q", concurrency=1, batch_size=batch_size,
               max_length=32, also=[("document", "document", "_d", 128)], rows_per_call=rows_per_call,
               num_threads=threads, stats=stats)
    start = time.perf_counter()
    n = ds.materialize().count()
    wall = time.perf_counter() - start
    recs = ray.get(stats.get.remote())["embed"].values()
    actor = sum(s for _, s in recs)
    assert n == len(queries)
    return {"pairs": n, "threads": threads, "bare_pairs_per_s": round(n / bare, 1),
            "ray_stage_pairs_per_s_wall": round(n / wall, 1),
            "ray_actor_pairs_per_s": round(n / actor, 1) if actor else None,
            "ratio_wall": round(bare / wall, 3), "ratio_actor": round(bare / actor, 3) if actor else None}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,300000")
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads per embedding actor")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rows-per-call", type=int, default=2048)
    p.add_argument("--encode-pairs", type=int, default=100_000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]  # --sizes '': encode comparison only


    from jobs.filter import FilterConfig, run
    from raylib.jobs.ray_env import init_data_ray
    from raylib.config import load_config
    from raylib.tiny import save_tiny_encoder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="filter_scale_"))
    model = str(save_tiny_encoder(work / "tiny", hidden_size=args.hidden, max_length=128))
    init_data_ray(8)  # what the job itself does on a local Ray
    from ray.data import DataContext

    DataContext.get_current().execution_no_progress_timeout_s = 900
    results = {"model": f"tiny bert hidden {args.hidden}", "shard_size": args.shard_size, "runs": []}
    for n in sizes:
        files = make_pairs(n, work / f"in_{n}", seed=n)
        cfg = load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", [
            f"input={work / f'in_{n}'}", f"output={work / f'kept_{n}'}",
            f"rejects={work / f'rejects_{n}'}", f"model={model}", f"shard_size={args.shard_size}",
            f"top_k={args.top_k}", f"batch_size={args.batch_size}", f"rows_per_call={args.rows_per_call}",
            f"num_threads_per_actor={args.threads}", "document_max_tokens=128", "read_blocks=null",
            "max_chars=100000"])
        with WorkerMemory() as mem:
            start = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - start
        row = {"pairs": n, "files": len(files), "seconds": round(wall, 1),
               "pairs_per_s": round(n / wall, 1), "shards": summary["shards"],
               "kept": summary["kept"], "throughput": summary["throughput"], **mem.summary()}
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
        if n == sizes[0]:
            results["encode"] = encode_comparison(files, model, args.encode_pairs, args.threads,
                                                  args.batch_size, args.rows_per_call)
            print(json.dumps(results["encode"]), flush=True)
    if not sizes:
        files = make_pairs(args.encode_pairs, work / "in_encode", seed=0)
        results["encode"] = encode_comparison(files, model, args.encode_pairs, args.threads,
                                              args.batch_size, args.rows_per_call)
    for row in results["runs"]:
        print(f"{row['pairs']:>9} pairs: {row['pairs_per_s']:>8} pairs/s, peak worker RSS "
              f"{row['peak_worker_rss_mib']} MiB (private {row['peak_worker_private_mib']} MiB)")
    if "encode" in results:
        e = results["encode"]
        print(f"encode stage: bare {e['bare_pairs_per_s']} pairs/s, Ray stage {e['ray_stage_pairs_per_s_wall']}"
              f" pairs/s wall (ratio {e['ratio_wall']}), inside actor ratio {e['ratio_actor']} (goal >= 0.9)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
