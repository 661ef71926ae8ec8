"""Scale benchmark for jobs/filter.py with a tiny model: pairs/s and peak memory per Ray worker
as the data set grows (shard_size fixed, so the number of shards grows), and the encode stage's
throughput against a bare single-process Encoder.encode loop on the same data and cores (both
timed from the model on disk to the last embedding: the Ray side includes actor start-up).

  python bench/filter_scale.py --sizes 100000,300000 [--shard-size 50000] [--encode-pairs 20000]
  python bench/filter_scale.py --sizes 100000,1000000          # the issue's 100k -> 1M check
  python bench/filter_scale.py --sizes '' --encode-pairs 300000  # encode comparison only
  python bench/filter_scale.py --sizes '' --encode-pairs 100000 --tokenize-modes actor,upstream
  python bench/filter_scale.py --sizes '' --encode-pairs 5000 --encode-model minilm

Peak memory is sampled every 0.5 s over every worker process of the local Ray started here
(RSS and RSS minus shared pages, which excludes the mapped object store). Goal: flat per-worker
peak from the smallest to the largest size; encode ratio >= 0.9. The encode stage runs once per
tokenization mode (token ids made in the actor, or by CPU map_batches tasks upstream of it) and
prints the actor's time split: tokenize seconds vs model seconds (and the upstream tasks' own
tokenize seconds). Last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from toolkit import MIB, ROOT, MemorySampler, emit

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


def worker_title(proc) -> str | None:
    """A Ray worker's process title (ray::<task or actor>), None for any other process."""
    title = " ".join(proc.cmdline())[:60]
    return title if title.startswith("ray::") else None


def worker_memory() -> MemorySampler:
    """Samples every 0.5 s the Ray workers under this session's raylet."""
    import ray

    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    return MemorySampler(500, children=True, root_pid=raylet, label=worker_title)


def memory_summary(mem: MemorySampler) -> dict:
    """The largest worker's peak RSS and private memory, with its title at that peak."""
    peak, peak_private = mem.by_pid("rss"), mem.by_pid("private")
    rss = max(peak.values(), default=(0, ""))
    private = max(peak_private.values(), default=(0, ""))
    return {"peak_worker_rss_mib": round(rss[0] / MIB, 1), "peak_rss_worker": rss[1],
            "peak_worker_private_mib": round(private[0] / MIB, 1), "peak_private_worker": private[1],
            "workers_seen": len(peak), "peak_private_mib_by_stage": by_stage(peak_private)}


def by_stage(peak_private: dict[int, tuple[int, str]]) -> dict[str, float]:
    """Peak private MiB per worker kind (the process title at its peak, e.g. the embed actor)."""
    out: dict[str, float] = {}
    for size, title in peak_private.values():
        name = title.removeprefix("ray::").strip()[:40]
        out[name] = max(out.get(name, 0.0), round(size / MIB, 1))
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:6])


def _ray_encode(table, model: str, threads: int, batch_size: int, rows_per_call: int,
                upstream: bool) -> dict:
    """The Ray Data embedding stage on `table` (queries + documents) with token ids made in the
    actor or upstream; wall seconds, actor seconds and their tokenize/model split."""
    import ray

    from raylib.ray_data.consistency import CurationStats
    from raylib.ray_data.embed import embed

    stats = CurationStats.remote()
    blocks = [table.slice(s, 10_000) for s in range(0, table.num_rows, 10_000)]
    ds = embed(ray.data.from_arrow(blocks), model, "query", "query", "_q", concurrency=1,
               batch_size=batch_size, max_length=32, also=[("document", "document", "_d", 128)],
               rows_per_call=rows_per_call, num_threads=threads, stats=stats,
               tokenize_upstream=upstream)
    start = time.perf_counter()
    n = ds.materialize().count()
    wall = time.perf_counter() - start
    got = ray.get(stats.get.remote())
    actor = sum(s for _, s in got["embed"].values())
    split = {k: round(sum(s[k] for s in got["embed_split"].values()), 2) for k in ("tokenize_s", "model_s")}
    upstream_s = round(sum(s for _, s in got["tokenize"].values()), 2)
    assert n == table.num_rows
    return {"pairs_per_s_wall": round(n / wall, 1), "wall_s": round(wall, 1),
            "actor_s": round(actor, 2), "actor_pairs_per_s": round(n / actor, 1) if actor else None,
            "actor_tokenize_s": split["tokenize_s"], "actor_model_s": split["model_s"],
            "upstream_tokenize_task_s": upstream_s}


def encode_comparison(files: list[Path], model: str, pairs: int, threads: int, batch_size: int,
                      rows_per_call: int, modes: list[str], repeats: int = 1) -> dict:
    """Bare in-process Encoder.encode over `pairs` pairs vs the Ray Data embedding stage, with
    token ids made in the actor ("actor") and by CPU tasks upstream of it ("upstream"); the
    modes alternate `repeats` times and each keeps its fastest run (shared, noisy cores)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raylib.model import Encoder

    table = pa.concat_tables([pq.read_table(f) for f in files]).slice(0, pairs)
    queries = table.column("query").to_pylist()
    docs = table.column("document").to_pylist()
    torch.set_num_threads(threads)
    start = time.perf_counter()  # both sides: from the model on disk to all embeddings
    enc = Encoder.from_pretrained(model, device="cpu")
    tok_s = 0.0
    for s in range(0, len(queries), rows_per_call):  # same call sizes as the actor gets
        t0 = time.perf_counter()
        q = enc.tokenize(queries[s:s + rows_per_call], "query", 32, padding=False)["input_ids"]
        d = enc.tokenize(docs[s:s + rows_per_call], "document", 128, padding=False)["input_ids"]
        tok_s += time.perf_counter() - t0
        enc.encode_features(q, batch_size=batch_size)
        enc.encode_features(d, batch_size=batch_size)
    bare = time.perf_counter() - start
    del enc
    n = len(queries)
    out = {"pairs": n, "threads": threads, "bare_pairs_per_s": round(n / bare, 1),
           "bare_s": round(bare, 1), "bare_tokenize_s": round(tok_s, 2), "modes": {}}
    for _ in range(repeats):
        for mode in modes:
            r = _ray_encode(table, model, threads, batch_size, rows_per_call, upstream=mode == "upstream")
            r["ratio_wall"] = round(bare / r["wall_s"], 3)
            r["ratio_actor"] = round(bare / r["actor_s"], 3) if r["actor_s"] else None
            print(json.dumps({"mode": mode, **r}), flush=True)
            if r["wall_s"] < out["modes"].get(mode, {"wall_s": float("inf")})["wall_s"]:
                out["modes"][mode] = r
    if {"actor", "upstream"} <= set(modes):
        m = out["modes"]
        out["upstream_over_actor_wall"] = round(m["upstream"]["pairs_per_s_wall"]
                                                / m["actor"]["pairs_per_s_wall"], 3)
    return out


def print_encode(e: dict) -> None:
    """One line per tokenization mode: throughput, ratio to bare, the actor's time split."""
    print(f"encode stage, {e['pairs']} pairs: bare {e['bare_pairs_per_s']} pairs/s "
          f"(tokenizer {e['bare_tokenize_s']} of {e['bare_s']} s)")
    for mode, r in e["modes"].items():
        print(f"  tokenize {mode:>8}: {r['pairs_per_s_wall']:>8} pairs/s wall (ratio {r['ratio_wall']}),"
              f" actor {r['actor_s']} s = tokenize {r['actor_tokenize_s']} s + model "
              f"{r['actor_model_s']} s; upstream tokenizer tasks {r['upstream_tokenize_task_s']} s")
    if "upstream_over_actor_wall" in e:
        print(f"  upstream / in-actor wall throughput: {e['upstream_over_actor_wall']}")


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
    p.add_argument("--tokenize-modes", default="actor,upstream",
                   help="where the encode comparison makes token ids: actor, upstream or both")
    p.add_argument("--repeats", type=int, default=1, help="encode runs per mode (alternating; best kept)")
    p.add_argument("--encode-model", default=None,
                   help="model for the encode comparison (default: the tiny model; e.g. minilm)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    modes = [m for m in args.tokenize_modes.split(",") if m]
    if not set(modes) <= {"actor", "upstream"}:
        p.error(f"--tokenize-modes takes actor and/or upstream, got {args.tokenize_modes!r}")
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]  # --sizes '': encode comparison only

    from raylib.ray_env import init_data_ray
    from raylib.tiny import save_tiny_encoder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="filter_scale_"))
    model = str(save_tiny_encoder(work / "tiny", hidden_size=args.hidden, max_length=128))
    init_data_ray(8)  # what the job itself does on a local Ray
    from ray.data import DataContext

    DataContext.get_current().execution_no_progress_timeout_s = 900
    results = {"model": f"tiny bert hidden {args.hidden}", "shard_size": args.shard_size, "runs": []}
    encode_model = args.encode_model or model
    if sizes:
        from raylib.jobs.filter import FilterConfig, run
        from raylib.config import load_config
    for n in sizes:
        files = make_pairs(n, work / f"in_{n}", seed=n)
        cfg = load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", [
            f"input={work / f'in_{n}'}", f"output={work / f'filter_{n}'}", f"model={model}", f"shard_size={args.shard_size}",
            f"top_k={args.top_k}", f"batch_size={args.batch_size}", f"rows_per_call={args.rows_per_call}",
            f"num_threads_per_actor={args.threads}", "document_max_tokens=128", "read_blocks=null",
            "max_chars=100000"])
        with worker_memory() as mem:
            start = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - start
        row = {"pairs": n, "files": len(files), "seconds": round(wall, 1),
               "pairs_per_s": round(n / wall, 1), "shards": summary["shards"],
               "kept": summary["kept"], "throughput": summary["throughput"], **memory_summary(mem)}
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
        if n == sizes[0]:
            results["encode"] = encode_comparison(files, encode_model, args.encode_pairs, args.threads,
                                                  args.batch_size, args.rows_per_call, modes, args.repeats)
    if not sizes:
        files = make_pairs(args.encode_pairs, work / "in_encode", seed=0)
        results["encode"] = encode_comparison(files, encode_model, args.encode_pairs, args.threads,
                                              args.batch_size, args.rows_per_call, modes, args.repeats)
    for row in results["runs"]:
        print(f"{row['pairs']:>9} pairs: {row['pairs_per_s']:>8} pairs/s, peak worker RSS "
              f"{row['peak_worker_rss_mib']} MiB (private {row['peak_worker_private_mib']} MiB)")
    if "encode" in results:
        print_encode(results["encode"])
    emit(__file__, results)
    return results


if __name__ == "__main__":
    main()
