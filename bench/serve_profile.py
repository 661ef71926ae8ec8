"""Where one request's time goes at 1 client: p50 of each layer of the serving path, for the
current app and (with --rev) the app of an older commit, in the same run on the same model.

    python bench/serve_profile.py --model minilm --requests 100 --colocate
    python bench/serve_profile.py --model minilm --requests 100 --serve-proxy   # the old ingress

Layers, each measured by itself (p50 over --requests sequential calls of one SciFact text):
  in_process      encoder.encode of the text in this process (the model alone)
  handle          the Encoder deployment through a handle from this process (hop + batching +
                  model, no HTTP, no ingress)
  health          GET /health (HTTP + proxy + ingress hop, no model)
  embeddings      POST /v1/embeddings (the whole path)
  ingress_json    pydantic parse + JSON render (orjson) of one 384-d answer, in this process
Variants: `current` (Ingress + Encoder deployments), `colocated` (--colocate: the model in the
ingress, as serve/config.yaml deploys it); HAProxy + direct ingress unless --serve-proxy.
Last stdout line: one JSON object with the p50s and the differences between layers.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from toolkit import ROOT, emit, free_port, scifact_texts

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def p50(fn, n: int) -> float:
    """Median milliseconds of n calls after one warm-up."""
    fn()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return round(float(np.median(lat)) * 1e3, 2)


def old_app_module(rev: str, workdir: Path) -> str:
    """Write raylib/ray_serve/app.py of `rev` as package serve_rev (its replicas import it by that name)."""
    pkg = workdir / "serve_rev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    code = subprocess.run(["git", "show", f"{rev}:raylib/ray_serve/app.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    (pkg / "app.py").write_text(code)
    return "serve_rev.app"


def load_module(name: str, root: Path):
    """Import package module `name` from `root` here; its replicas find it through the
    PYTHONPATH that the old app() builder sets to its own root."""
    import importlib.util

    pkg, _, mod = name.partition(".")
    for qual, path in ((pkg, root / pkg / "__init__.py"), (name, root / pkg / f"{mod}.py")):
        spec = importlib.util.spec_from_file_location(qual, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[qual] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def profile_app(build, label: str, args, text: str, port: int) -> dict:
    """Deploy one app variant and time each layer."""
    import httpx
    from ray import serve

    serve.run(build({"model": args.model, "num_cpus": 1, "torch_threads": args.threads,
                     "batch_wait_timeout_s": args.batch_wait}), name=label, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    item = {"texts": [text], "kind": "document", "dense": True}
    out = {}
    with httpx.Client(base_url=base, timeout=60) as c:
        out["embeddings"] = p50(lambda: c.post("/v1/embeddings", json={"input": text}), args.requests)
        out["health"] = p50(lambda: c.get("/health"), args.requests)
    # Awaited on one event loop: a handle whose router shares the caller's loop
    # (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0) cannot be used from sync code.
    if label == "colocated":  # no Encoder deployment: the model is in the ingress
        serve.delete(label)
        return out
    handle = serve.get_deployment_handle("Batcher", app_name=label)
    loop = asyncio.new_event_loop()

    async def call():
        return await handle.encode.remote(item)
    out["handle"] = p50(lambda: loop.run_until_complete(call()), args.requests)
    loop.close()
    serve.delete(label)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-wait", type=float, default=0.0,
                   help="batch_wait_timeout_s for the current app (the old default was 0.005)")
    p.add_argument("--serve-proxy", action="store_true",
                   help="Serve's Python HTTP proxy instead of HAProxy + direct ingress")
    p.add_argument("--colocate", action="store_true",
                   help="also profile the app with the model inside the ingress (one hop fewer)")
    p.add_argument("--rev", default=None, help="also profile raylib/ray_serve/app.py of this git revision")
    args = p.parse_args()

    from ray import serve

    from raylib.ray_env import init_ray
    from raylib.backends import load_encoder
    from raylib.ray_serve.app import app, start_serve
    from raylib.ray_serve.middleware import FastJSONResponse
    from raylib.ray_serve.schemas import EmbeddingsRequest

    text = scifact_texts(1, 300, shuffle=False)[0]  # the corpus's first document (or synthetic)
    report: dict = {"model": args.model, "text_chars": len(text), "threads": args.threads,
                    "loadavg_start": round(os.getloadavg()[0], 1)}
    enc = load_encoder(args.model, "torch", device="cpu", threads=args.threads)
    report["in_process"] = p50(lambda: enc.encode([text], batch_size=1), args.requests)
    vec = enc.encode([text])["dense"][0]
    body = json.dumps({"input": text, "model": args.model})

    def parse_render():
        EmbeddingsRequest.model_validate_json(body)
        FastJSONResponse({"data": [{"embedding": vec}]})
    report["ingress_json"] = p50(parse_render, args.requests)
    del enc

    variants = {"current": lambda a: app({**a, "colocate": False})}
    if args.colocate:
        variants["colocated"] = lambda a: app({**a, "colocate": True})
    tmp = tempfile.TemporaryDirectory()
    if args.rev:
        old = load_module(old_app_module(args.rev, Path(tmp.name)), Path(tmp.name))
        variants[f"rev_{args.rev}"] = lambda a: old.app({**a, "batch_wait_timeout_s": 0.005})
    init_ray(num_cpus=8, log_to_driver=False)
    port = free_port()
    start_serve(port=port, fast_ingress=not args.serve_proxy, drain_s=1)
    report["ingress"] = "serve-proxy" if args.serve_proxy else "haproxy-direct"
    for label, build in variants.items():
        try:
            res = profile_app(build, label, args, text, port)
        except Exception as exc:  # noqa: BLE001 - an old revision may not deploy today
            res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if "handle" in res:
            res["hop_and_batching"] = round(res["handle"] - report["in_process"], 2)
            res["http_proxy_ingress"] = round(res["embeddings"] - res["handle"], 2)
            res["total_minus_in_process"] = round(res["embeddings"] - report["in_process"], 2)
        report[label] = res
        print(f"{label}: {res}", flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    report["loadavg_end"] = round(os.getloadavg()[0], 1)
    emit(__file__, report)


if __name__ == "__main__":
    main()
