"""Serving benchmark: throughput and p50/p99 latency of /v1/embeddings at 1 and 32 concurrent
clients for each Encoder backend (torch, onnx, onnx-int8), against an in-process encode of the
same batches on the same backend and infinity-emb serving the same model directory on the same
cores. All contenders are up at once and take turns, level by level, for --rounds rounds (the
best round is reported, every round's texts/s beside it): on a shared box the load drifts over
minutes, and turns keep the ratios same-moment. Optional --load: the issue's bounded load test (2,000 valid requests from 32 clients +
500 malformed; no 5xx but deliberate 503s).

    python bench/serve_bench.py --model minilm --requests 200 --backends torch,onnx-int8

infinity-emb 0.0.78 needs transformers 4 (it calls batch_encode_plus, which transformers 5, the
project's pin, removed), numpy<2-era huggingface_hub and pyarrow<17 (pyarrow 17+ needs NumPy 2),
so it runs from its own venv outside the repository (--infinity-venv, default ../venvs/infinity
relative to the repository root), made once from the repository root with:
    python3.11 -m venv ../venvs/infinity && ../venvs/infinity/bin/pip install torch==2.13.0 \
        'infinity-emb[server,optimum]==0.0.78' 'transformers==4.57.6' 'sentence-transformers<5' \
        'datasets<4' 'pyarrow<17' 'optimum[onnxruntime]==2.1.0' 'optimum-onnx==0.1.0'
If it cannot start, the reason is printed and the rest of the report still comes out.
The onnx-int8 backend's peer is infinity-emb's ONNX engine (`--engine optimum --pooling-method
mean`) on the file optimum's own tools make (`optimum-cli export onnx --library-name transformers`,
then `optimum-cli onnxruntime quantize --<arch>`, arch from this CPU or --optimum-arch; cached
under runs/bench/infinity-optimum/): column `infinity_optimum`, ratio
onnx_int8_vs_infinity_optimum_throughput. fidelity_cosine_to_torch: each contender's served
vectors of --fidelity-texts texts against the in-process torch ones.
Data: SciFact documents from ../shared/data/scifact relative to the repository (synthetic text
if absent). Last stdout line: one JSON object; ratios.c<N> holds serve_vs_in_process_throughput,
serve_vs_infinity_throughput and serve_p50_minus_in_process_ms (torch backend) and
<backend>_vs_torch_throughput for every other backend.
"""

import argparse
import asyncio
import collections
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from toolkit import ROOT, emit, free_port, scifact_texts  # noqa: E402


def percentiles(lat_s: list[float]) -> dict:
    arr = np.asarray(lat_s) * 1e3
    return {"p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2)}


async def http_load(url: str, bodies: list[dict], concurrency: int, headers: dict | None = None
                    ) -> dict:
    """Send bodies from `concurrency` clients; returns throughput, latency and status counts."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    lat: list[float] = []
    codes: dict[int, int] = {}
    n_texts = 0

    async with httpx.AsyncClient(timeout=120, headers=headers or {},
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            nonlocal n_texts
            while not queue.empty():
                body = queue.get_nowait()
                t = time.perf_counter()
                if isinstance(body, bytes):
                    r = await client.post(url, content=body,
                                          headers={"Content-Type": "application/json"})
                else:
                    r = await client.post(url, json=body)
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200 and isinstance(body, dict):
                    n_texts += len(body["input"]) if isinstance(body["input"], list) else 1

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return {"requests": len(bodies), "elapsed_s": round(elapsed, 2),
            "req_per_s": round(len(bodies) / elapsed, 1), "texts_per_s": round(n_texts / elapsed, 1),
            **percentiles(lat), "status": {str(k): v for k, v in sorted(codes.items())}}


def in_process(encoder, texts: list[str], batch: int) -> dict:
    """encoder.encode on the same texts in batches of `batch` (what the server can form)."""
    lat = []
    encoder.encode(texts[:batch], kind="document")  # warm-up
    start = time.perf_counter()
    for s in range(0, len(texts), batch):
        t = time.perf_counter()
        encoder.encode(texts[s:s + batch], kind="document", batch_size=batch)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"batch": batch, "elapsed_s": round(elapsed, 2),
            "texts_per_s": round(len(texts) / elapsed, 1), **percentiles(lat)}


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> str | None:
    """Poll url until 200; returns an error string on timeout or process exit."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"process exited with code {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return f"not ready after {timeout_s:.0f} s"


def start_infinity(venv: Path, model_dir: str, port: int, batch: int, log: Path, threads: int,
                   niceness: int, engine: str = "torch"):
    """infinity_emb v2 serving the same model dir on CPU; (process, None) or (None, reason).
    engine "optimum": ONNX Runtime on the `*quantize*.onnx` file in model_dir (optimum_model)."""
    exe = venv / "bin" / "infinity_emb"
    if not exe.exists():
        return None, (f"{exe} not found: create the venv and `pip install 'infinity-emb[server]'` "
                      "(not installed into the project venv: it pins numpy<2, which breaks "
                      "pandas/faiss there)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
               DO_NOT_TRACK="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # optimum engine: infinity 0.0.78 hands optimum 2 the ONNX file's path as found under the model
    # id, and optimum matches it against bare file names: serve "." from inside the model dir.
    cwd = model_dir if engine == "optimum" else None
    cmd = [str(exe), "v2", "--model-id", "." if cwd else model_dir, "--served-model-name", "minilm",
           "--port", str(port), "--host", "127.0.0.1", "--engine", engine, "--device", "cpu",
           "--batch-size", str(batch), "--url-prefix", "/v1", "--no-bettertransformer"]
    if engine == "optimum":  # its ONNX graph ends at the token states: pool as the model does
        cmd += ["--pooling-method", "mean"]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            preexec_fn=lambda: os.nice(niceness))
    err = wait_http(f"http://127.0.0.1:{port}/health", 300, proc)  # not under --url-prefix
    if err:
        proc.kill()
        tail = log.read_text()[-1500:] if log.exists() else ""
        return None, f"infinity_emb failed to start ({err}); log tail:\n{tail}"
    return proc, None


def config_args() -> dict:
    """The application args of serve/config.yaml: the benchmark serves what users deploy."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    return dict(config["applications"][0]["args"])


def deploy_backends(args, port: int) -> dict[str, str]:
    """One app per backend at /<backend> on the same Serve instance, with serve/config.yaml's
    args (colocate, capacity) and this run's model, batch size and threads; returns their URLs."""
    from ray import serve

    from raylib.ray_serve.app import app

    base = {**config_args(), "model": args.model, "max_batch_size": args.max_batch_size,
            "num_cpus": 1, "torch_threads": args.threads,
            "max_ongoing_requests": max(64, args.max_batch_size)}
    variants = {b: {**base, "backend": b} for b in args.backends}
    if args.split:  # torch with the model in its own Encoder deployment (one gRPC hop more)
        variants["split"] = {**base, "backend": "torch", "colocate": False}
    urls = {}
    for name, app_args in variants.items():
        serve.run(app(app_args), name=f"bench-{name}", route_prefix=f"/{name}")
        urls[name] = f"http://127.0.0.1:{port}/{name}/v1/embeddings"
    return urls


def load_test(args, url: str, port: int, texts: list[str]) -> dict:
    """2,000 valid + 500 malformed requests from 32 clients: no 5xx other than 503."""
    import httpx

    short = [t[:args.load_max_chars] for t in texts]
    valid = [{"input": short[i % len(short)]} for i in range(args.load_valid)]
    bad_bodies = [{"input": []}, {"input": 3}, {"inpt": "x"}, {"input": "x", "dimensions": 9999},
                  {"input": ["x" * 30000]}, {"input": [None]}, b"\x00garbage",
                  b'{"input": "lone \\ud800 surrogate"}', b'{"input": "x", "dimensions": 1e39}']
    bad = [bad_bodies[i % len(bad_bodies)] for i in range(args.load_bad)]
    mixed = valid + bad
    random.Random(0).shuffle(mixed)
    res = asyncio.run(http_load(url, mixed, 32))
    health = url.replace("/v1/embeddings", "/health")
    res["alive_after"] = httpx.get(health, timeout=10).status_code
    res["5xx_other_than_503"] = sum(v for s, v in res["status"].items()
                                    if s.startswith("5") and s != "503")
    res["valid"], res["malformed"] = args.load_valid, args.load_bad
    print(f"load test: {res}", flush=True)
    return res


def infinity_venv(args) -> Path:
    venv = Path(args.infinity_venv)
    return venv if venv.is_absolute() else ROOT / venv


def start_infinity_for(args, model_dir: str, engine: str = "torch"):
    """(process, url) of infinity-emb on the same model dir and threads, or (None, reason)."""
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"infinity_bench_{port}.log"
    proc, why = start_infinity(infinity_venv(args), model_dir, port, args.max_batch_size, log,
                               args.threads, args.niceness, engine)
    if proc is None:
        print(f"infinity ({engine}) not run: {why}", flush=True)
        return None, f"not run: {why}"
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def optimum_arch() -> str:
    """optimum-cli's quantization target for this CPU: what its exporter users would pick."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def optimum_model(args, model_dir: str) -> str:
    """The model as infinity-emb's ONNX engine serves it: optimum's exporter (`--library-name
    transformers`: token states out) then `optimum-cli onnxruntime quantize --<arch>` (dynamic int8
    of every MatMul), cached under runs/bench/infinity-optimum/<arch>/."""
    out = ROOT / "runs" / "bench" / "infinity-optimum" / args.optimum_arch
    cli = str(infinity_venv(args) / "bin" / "optimum-cli")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not (out / "quantized" / "model_quantized.onnx").exists():
        subprocess.run([cli, "export", "onnx", "-m", model_dir, "--library-name", "transformers",
                        "--task", "feature-extraction", str(out / "fp32")], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run([cli, "onnxruntime", "quantize", "--onnx_model", str(out / "fp32"),
                        f"--{args.optimum_arch}", "-o", str(out / "quantized")], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return str(out / "quantized")


def fidelity(url: str, texts: list[str], ref: np.ndarray) -> dict:
    """Cosine of the served vectors of `texts` to the in-process torch ones (min, mean)."""
    import httpx

    got = []
    for text in texts:
        r = httpx.post(url, json={"input": [text], "model": "minilm"}, timeout=60)
        r.raise_for_status()
        got.append(r.json()["data"][0]["embedding"])
    got = np.asarray(got, np.float32)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    return {"min": round(float(cos.min()), 4), "mean": round(float(cos.mean()), 4), "n": len(texts)}


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes, the Serve replicas among them
    (RAY_worker_niceness, 15 by default, so that its control plane keeps priority)."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(_niceness).remote())


def _niceness() -> int:
    return os.nice(0)


def best_round(runs: list[dict]) -> dict:
    """The round with the highest throughput (the least disturbed by other work on a shared
    box), with every round's texts/s beside it."""
    best = dict(max(runs, key=lambda r: r["texts_per_s"]))
    best["rounds_texts_per_s"] = [r["texts_per_s"] for r in runs]
    return best


def ratios(report: dict, backends: list[str], concurrency: list[int]) -> dict:
    """Same-run ratios per concurrency level (torch is the reference backend)."""
    out: dict = {}
    served, local = report["ray_serve"], report["in_process"]
    for c in concurrency:
        key, r = f"c{c}", {}
        if "torch" in served:
            tps = served["torch"][key]["texts_per_s"]
            r["serve_vs_in_process_throughput"] = round(tps / local["torch"][key]["texts_per_s"], 3)
            r["serve_p50_minus_in_process_ms"] = round(
                served["torch"][key]["p50_ms"] - local["torch"][key]["p50_ms"], 1)
            if isinstance(report.get("infinity"), dict):
                r["serve_vs_infinity_throughput"] = round(
                    tps / report["infinity"][key]["texts_per_s"], 3)
            if isinstance(report.get("infinity_optimum"), dict) and "onnx-int8" in served:
                r["onnx_int8_vs_infinity_optimum_throughput"] = round(
                    served["onnx-int8"][key]["texts_per_s"] / report["infinity_optimum"][key]["texts_per_s"], 3)
            for b in backends:
                if b != "torch":
                    r[f"{b}_vs_torch_throughput"] = round(served[b][key]["texts_per_s"] / tps, 3)
        if "split" in served and "torch" in local:
            col = served["split"][key]
            r["split_vs_in_process_throughput"] = round(
                col["texts_per_s"] / local["torch"][key]["texts_per_s"], 3)
            r["split_p50_minus_in_process_ms"] = round(
                col["p50_ms"] - local["torch"][key]["p50_ms"], 1)
            if isinstance(report.get("infinity"), dict):
                r["split_vs_infinity_throughput"] = round(
                    col["texts_per_s"] / report["infinity"][key]["texts_per_s"], 3)
        for b in backends:
            r[f"{b}_serve_vs_in_process_throughput"] = round(
                served[b][key]["texts_per_s"] / local[b][key]["texts_per_s"], 3)
        out[key] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--backends", default="torch,onnx-int8",
                   help="comma-separated Encoder backends: torch, onnx, onnx-int8")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=300)
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="texts per forward in every contender; default: serve/config.yaml's")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads in every contender (1 is fastest on a shared 2-core box)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=2,
                   help="turns of every contender per level; the best round is reported")
    p.add_argument("--load", action="store_true", help="also run 2,000 valid + 500 malformed")
    p.add_argument("--load-valid", type=int, default=2000)
    p.add_argument("--load-bad", type=int, default=500)
    p.add_argument("--load-max-chars", type=int, default=80, help="short texts: robustness run")
    p.add_argument("--split", action="store_true",
                   help="also serve torch with the model in its own Encoder deployment (serve/split)")
    p.add_argument("--serve-proxy", action="store_true",
                   help="Serve's Python HTTP proxy instead of HAProxy + direct ingress "
                        "(raylib.ray_serve.app.FAST_INGRESS_ENV): the slower path, for comparison")
    p.add_argument("--no-infinity", action="store_true")
    p.add_argument("--no-infinity-optimum", action="store_true",
                   help="skip infinity-emb's ONNX engine (the onnx-int8 peer)")
    p.add_argument("--optimum-arch", default=None, choices=["avx2", "avx512", "avx512_vnni"],
                   help="optimum-cli quantize target; default: this CPU's")
    p.add_argument("--fidelity-texts", type=int, default=50,
                   help="texts whose served vectors are compared with in-process torch")
    p.add_argument("--infinity-venv", default="../venvs/infinity",
                   help="relative paths are taken from the repository root")
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.max_batch_size = args.max_batch_size or config_args()["max_batch_size"]
    args.optimum_arch = args.optimum_arch or optimum_arch()

    from ray import serve

    from raylib.ray_env import init_ray
    from raylib.backends import BACKENDS, load_encoder
    from raylib.registry import resolve_model_path
    from raylib.ray_serve.app import start_serve

    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    model_dir = str(resolve_model_path(args.model))
    n_req, k = args.requests, args.texts_per_request
    texts = scifact_texts(n_req * k, args.max_chars)
    bodies = [{"input": texts[i * k:(i + 1) * k], "model": args.model} for i in range(n_req)]
    report: dict = {"model": args.model, "backends": args.backends, "requests": n_req,
                    "texts_per_request": k, "max_chars": args.max_chars, "threads": args.threads,
                    "max_batch_size": args.max_batch_size,
                    "cpus": os.cpu_count(), "loadavg_start": round(os.getloadavg()[0], 1)}

    # Every contender is up at once and they take turns, level by level, for --rounds rounds:
    # on a shared box the load drifts over minutes, and turns keep the ratios same-moment.
    encoders = {b: load_encoder(model_dir, b, device="cpu", threads=args.threads)
                for b in args.backends}
    init_ray(num_cpus=8, log_to_driver=False)
    # Same cores, same priority: infinity-emb runs at the niceness of our replicas (the load
    # generator and the in-process baseline stay at this process's own).
    report["server_niceness"] = ray_worker_niceness()
    args.niceness = report["server_niceness"] - os.nice(0)
    proc, infinity_url = (None, "skipped (--no-infinity)") if args.no_infinity else \
        start_infinity_for(args, model_dir)
    proc_opt, optimum_url = (None, "skipped (--no-infinity-optimum)") \
        if args.no_infinity or args.no_infinity_optimum or "onnx-int8" not in args.backends else \
        start_infinity_for(args, optimum_model(args, model_dir), engine="optimum")
    report["optimum_arch"] = args.optimum_arch
    port = free_port()
    start_serve(port=port, fast_ingress=not args.serve_proxy, drain_s=1)
    report["ingress"] = "serve-proxy" if args.serve_proxy else "haproxy-direct"
    try:
        urls = deploy_backends(args, port)
        contenders = {f"serve/{b}": u for b, u in urls.items()}
        if proc is not None:
            contenders["infinity"] = infinity_url
        if proc_opt is not None:
            contenders["infinity_optimum"] = optimum_url
        reference = encoders["torch"] if "torch" in encoders else load_encoder(model_dir, "torch", device="cpu")
        ref = reference.encode(texts[:args.fidelity_texts], kind="document", batch_size=1)["dense"]
        report["fidelity_cosine_to_torch"] = {name: fidelity(url, texts[:args.fidelity_texts], ref)
                                              for name, url in contenders.items()}
        for url in contenders.values():
            asyncio.run(http_load(url, bodies[:32], 4))  # warm-up
        runs: dict = collections.defaultdict(list)
        for r in range(args.rounds):
            for c in args.concurrency:
                # in-process: 1 client = one request's texts per call; 32 = max_batch_size texts
                batch = k if c == 1 else min(args.max_batch_size, c * k)
                for b, enc in encoders.items():
                    runs[(f"in_process/{b}", c)].append(in_process(enc, texts, batch))
                for name, url in contenders.items():
                    runs[(name, c)].append(asyncio.run(http_load(url, bodies, c)))
                for (name, level), res in runs.items():
                    if level == c and len(res) == r + 1:
                        print(f"round {r + 1} {name} c={c}: {res[-1]}", flush=True)
        report["in_process"] = {b: {f"c{c}": best_round(runs[(f"in_process/{b}", c)])
                                    for c in args.concurrency} for b in args.backends}
        report["ray_serve"] = {b: {f"c{c}": best_round(runs[(f"serve/{b}", c)])
                                   for c in args.concurrency} for b in urls}
        report["infinity"] = ({f"c{c}": best_round(runs[("infinity", c)])
                               for c in args.concurrency} if proc is not None else infinity_url)
        report["infinity_optimum"] = ({f"c{c}": best_round(runs[("infinity_optimum", c)])
                                       for c in args.concurrency} if proc_opt is not None else optimum_url)
        if args.load:
            report["load"] = load_test(args, urls[args.backends[0]], port,
                                       [b["input"][0] for b in bodies])
    finally:
        for p_ in (proc, proc_opt):
            if p_ is not None:
                p_.terminate()
                p_.wait(30)
        serve.shutdown()
        import ray

        ray.shutdown()
    report["ratios"] = ratios(report, args.backends, args.concurrency)
    report["loadavg_end"] = round(os.getloadavg()[0], 1)
    emit(__file__, report)


if __name__ == "__main__":
    main()
