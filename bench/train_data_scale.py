"""Training data plane at scale: the prepare job (pre-tokenized per-source shards) and Train workers
that stream their rows of each step from the shards, for growing synthetic pair sets.

  python bench/train_data_scale.py --sizes 1000000,5000000

For each size, in a fresh process with its own local Ray: pairs written in parts of `--part` rows
(one raylib.train_data.synthetic_pairs part, copied with distinct ids: generating 5M rows row by
row would take longer than the measurement), then
- the prepare job (raylib.jobs.prepare, a Ray Data job): pairs/s;
- a short pretraining run on the prepared data (tiny model, 2 Train workers, 2 CPU threads):
  seconds from the job's start to the end of its first step (prepare excluded: the manifest is
  reused), and the fraction of step time the workers waited for their next batch (steps 2..N);
- peak private memory (RSS minus shared pages, sampled every 0.2 s) of the driver and of the
  largest Train worker.
Last stdout line: {"sizes": {"<n>": {"prepare_pairs_per_s", "driver_peak_mib", "worker_peak_mib",
"first_step_s", "data_wait_frac"}}}; before it, what the prepare throughput means for 1.41B pairs
(Arctic-Embed 2.0 §2.3) on the 4 x 192 vCPUs of cluster/h100.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from toolkit import MIB, ROOT, MemorySampler, emit, report_to_parent, run_per_size

ARCTIC_PAIRS = 1_410_000_000
CLUSTER_VCPUS = 4 * 192
SOURCES = {"web/en": 4.0, "news/de": 2.0, "wiki/es": 1.0, "qa/en": 1.0}


def driver_or_worker(proc) -> str | None:
    """"driver" (this process), "worker" (a Ray Train worker) or None (not counted)."""
    if proc.pid == os.getpid():
        return "driver"
    return "worker" if "TrainWorker" in " ".join(proc.cmdline()) else None


def write_parts(n: int, part: int, out: Path) -> None:
    """n pairs as Parquet parts of `part` rows: one synthetic part, copied with distinct ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylib.train_data import synthetic_pairs

    out.mkdir(parents=True, exist_ok=True)
    base = synthetic_pairs(min(part, n), SOURCES, seed=0)
    for k, start in enumerate(range(0, n, part)):
        rows = base.slice(0, min(part, n - start))
        ids = pa.array([f"p{start + i}" for i in range(rows.num_rows)])
        pq.write_table(rows.set_column(rows.column_names.index("id"), "id", ids), out / f"part-{k:04d}.parquet")


def child(n: int, args: argparse.Namespace) -> dict:
    """One size: write, prepare, train a few steps; the figures as a dict."""
    os.environ.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from raylib.config import load_config
    from raylib.jobs.prepare import PrepareConfig, prepare
    from raylib.jobs.pretrain import PretrainConfig
    from raylib.jobs.prepare import prepare_for_training
    from raylib.ray_train.loop import fit
    from raylib.train_config import ModelSection

    tiny = {"hidden_size": 32, "num_layers": 2, "max_length": 64}
    # peak private memory (rss - shared) of this process and of its Ray Train workers, every 0.2 s
    peak = MemorySampler(200, children=True, label=driver_or_worker)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, peak:
        tmp = Path(tmp)
        write_parts(n, args.part, tmp / "pairs")
        start = time.time()
        manifest = prepare(PrepareConfig(input=[str(tmp / "pairs")], output=str(tmp / "prepared"),
                                         model=ModelSection(name_or_path="tiny", tiny=tiny),
                                         query_max_length=16, document_max_length=32,
                                         row_group_rows=args.batch // 2, partition_mib=args.partition_mib,
                                         ray_num_cpus=8))
        prepare_s = time.time() - start
        cfg = load_config(PretrainConfig, ROOT / "jobs/configs/pretrain/debug.yaml", [
            "data.paths=[]", f"data.prepared={tmp / 'prepared'}", f"data.global_batch_size={args.batch}",
            f"train.max_steps={args.steps}", "train.grad_cache_chunk=0", "train.torch_threads=1",
            "train.log_every=1000", f"checkpoint.storage_path={tmp / 'ckpt'}", "checkpoint.every_steps=1000",
            "synthetic.rows=0", "scaling.num_workers=2", "scaling.max_failures=0"])
        fit_start = time.time()
        result = fit(cfg, cfg.loss, prepare_for_training(cfg, cfg.loss))
        rows = [json.loads(x) for x in Path(result["metrics_path"]).read_text().splitlines() if x.strip()]
    later = rows[1:]
    private = {k: v / MIB for k, v in peak.by_label("private").items()}
    return {"rows": manifest["rows"], "prepare_s": round(prepare_s, 1),
            "prepare_pairs_per_s": round(manifest["rows"] / manifest["seconds"], 1),
            "driver_peak_mib": round(private.get("driver", 0.0), 1),
            "worker_peak_mib": round(private.get("worker", 0.0), 1),
            "first_step_s": round(rows[0]["time"] - fit_start, 1),
            "data_wait_frac": round(sum(r["data_wait_s"] for r in later) / sum(r["step_s"] for r in later), 4),
            "step_s_median": sorted(r["step_s"] for r in later)[len(later) // 2], "steps": len(rows),
            "files": sum(len(v["files"]) for v in manifest["sources"].values())}


def print_size(n: int, r: dict) -> None:
    """One size's line: prepare throughput, peak memory, first step, data wait."""
    print(f"{n:>11,} pairs: prepare {r['prepare_pairs_per_s']:,.0f} pairs/s ({r['prepare_s']} s, "
          f"{r['files']} shards); driver peak {r['driver_peak_mib']} MiB, largest worker "
          f"{r['worker_peak_mib']} MiB; first step after {r['first_step_s']} s; data wait "
          f"{r['data_wait_frac']:.2%} of step time (median step {r['step_s_median']} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000")
    parser.add_argument("--part", type=int, default=250_000)
    parser.add_argument("--batch", type=int, default=64, help="global batch (2 workers)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--partition-mib", type=float, default=64.0)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--child", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        report_to_parent(child(args.child, args))
        return
    sizes = [int(x) for x in args.sizes.split(",") if x]
    child_args = ["--part", args.part, "--batch", args.batch, "--steps", args.steps,
                  "--partition-mib", args.partition_mib, *(["--tmp", args.tmp] if args.tmp else [])]
    out = dict(zip(sizes, run_per_size(__file__, sizes, child_args, cwd=ROOT, each=print_size)))
    sizes = sorted(out)
    if len(sizes) > 1:
        a, b = out[sizes[0]], out[sizes[-1]]
        print(f"{sizes[0]:,} -> {sizes[-1]:,}: driver {b['driver_peak_mib'] / a['driver_peak_mib']:.3f}x, "
              f"worker {b['worker_peak_mib'] / a['worker_peak_mib']:.3f}x, first step "
              f"{b['first_step_s'] / a['first_step_s']:.3f}x")
    cores = os.cpu_count() or 1
    best = out[sizes[-1]]["prepare_pairs_per_s"]
    minutes = ARCTIC_PAIRS / (best / cores * CLUSTER_VCPUS) / 60
    print(f"extrapolation: {best:,.0f} pairs/s on {cores} cores = {best / cores:,.0f} pairs/s per core; "
          f"1.41B pairs on {CLUSTER_VCPUS} vCPUs (4 x p5.48xlarge) at that rate per vCPU: {minutes:.0f} min "
          f"(linear scaling assumed; tiny WordPiece tokenizer here, an XLM-R tokenizer is slower per text)")
    emit(__file__, {"sizes": {str(n): {k: out[n][k] for k in ("prepare_pairs_per_s", "driver_peak_mib",
                                                                 "worker_peak_mib", "first_step_s",
                                                                 "data_wait_frac")} for n in sizes}})


if __name__ == "__main__":
    main()
