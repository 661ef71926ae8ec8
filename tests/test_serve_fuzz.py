"""Serve fuzz test (issue 18): seeded, generated malformed requests interleaved with valid ones
from concurrent clients. Every malformed request is a 4xx, nothing is a 5xx, every valid request
is 200 with the vectors the in-process encoder gives. The kill test (issue 24) kills a model
replica of each shipped layout under load: callers see 200 or 503 + Retry-After, never a 500 or a
connection closed without a response."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from raylib.ports import free_port

httpx = pytest.importorskip("httpx")

WORDS = "alpha beta gamma delta retrieval ray protein cell gene the of and query document".split()
N_VALID, N_BAD, CLIENTS = 160, 160, 16



ROOT = Path(__file__).resolve().parents[1]
# the shipped layouts: the model inside the ingress (CPU) or a Batcher deployment of its own (GPU)
LAYOUTS = {"colocated": "config.yaml", "split": "config_gpu.yaml"}


def layout_args(layout: str, tiny_dir) -> dict:
    """serve/<layout's config>'s args as far as they run on CPU: the tiny model, 2 model
    replicas, one ingress replica, a quarter CPU and one thread each; input limits small enough
    for the fuzz test's malformed requests to cross them."""
    from raylib.ray_serve.settings import deploy_args

    args = deploy_args(ROOT / "serve" / LAYOUTS[layout]).model_dump()
    args.update(model=str(tiny_dir), served_model_name="tiny", num_replicas=2, autoscaling=None,
                ingress_replicas=1, num_gpus=0, num_cpus=0.25, torch_threads=1,
                max_inputs_per_request=8, max_chars_per_input=300)
    return args


def haproxy_routes_to(app_name: str) -> int:
    """How many Ingress replicas of `app_name` HAProxy routes to (UP in its admin socket's `show
    stat`): serve.run returns once replicas run; HAProxy adds them after its health checks."""
    import csv
    import io
    import os
    import socket

    import ray
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

    path = os.path.join(os.path.dirname(RAY_SERVE_HAPROXY_SOCKET_PATH),  # one HAProxy per node
                        ray.get_runtime_context().get_node_id(), "admin.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"show stat\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
    except OSError:
        return 0
    rows = csv.DictReader(io.StringIO(data.decode(errors="replace").removeprefix("# ")))
    return sum(1 for row in rows if row["pxname"] == f"http-{app_name}" and row["status"] == "UP"
               and row["svname"].startswith(f"SERVE_REPLICA_{app_name}-Ingress-"))


@pytest.fixture(scope="module")
def layouts(ray_session, tiny_dir):
    """Serve on a free port behind the shipped fast ingress (HAProxy + direct ingress); calling
    the fixture's value with a layout deploys it at /<layout> (once) and returns its URL when
    HAProxy routes to all its ingress replicas."""
    from ray import serve

    from raylib.ray_serve.app import app, start_serve

    port = free_port()
    start_serve(port=port, drain_s=1)
    urls: dict[str, str] = {}

    def deploy(layout: str) -> str:
        if layout not in urls:
            args = layout_args(layout, tiny_dir)
            serve.run(app(args), name=layout, route_prefix=f"/{layout}")
            ingress = args["num_replicas"] if args["colocate"] else args["ingress_replicas"]
            deadline = time.monotonic() + 60
            while haproxy_routes_to(layout) < ingress and time.monotonic() < deadline:
                time.sleep(0.2)
            assert haproxy_routes_to(layout) == ingress, "HAProxy never routed to all replicas"
            urls[layout] = f"http://127.0.0.1:{port}/{layout}"
        return urls[layout]

    yield deploy
    serve.shutdown()


@pytest.fixture(scope="module")
def fuzz_server(layouts) -> str:
    return layouts("split")


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def valid_request(rng: random.Random) -> tuple[str, dict]:
    """A well-formed request of a random route and shape."""
    texts = [_text(rng) for _ in range(rng.randint(1, 4))]
    route = rng.choice(["/v1/embeddings", "/v1/embeddings", "/encode", "/rerank"])
    if route == "/v1/embeddings":
        body = {"input": texts if rng.random() < 0.7 else texts[0], "model": "tiny",
                "encoding_format": rng.choice(["float", "base64"])}
        if rng.random() < 0.3:
            body["dimensions"] = rng.randint(1, 32)
        return route, body
    if route == "/encode":
        return route, {"texts": texts, "kind": rng.choice(["query", "document"]),
                       "sparse": rng.random() < 0.5, "multivector": rng.random() < 0.5,
                       "quantization": rng.choice([None, "int8", "binary"])}
    return route, {"query": _text(rng), "documents": texts, "top_n": rng.randint(1, 5),
                   "weights": [rng.uniform(0, 1e6), rng.uniform(0, 2), rng.uniform(0.1, 1)]}


BAD_NUMBERS = ["Infinity", "-Infinity", "NaN", "1e39", "-1e39", "1e400", "1e308",
               "100000000000000000000000000000", "\"abc\"", "[]", "{}"]
BAD_TEXTS = ['"\\ud800"', '"x \\udfff y"', '"\\ud83d"', '""', '"   "', "5", "null", "[1, 2]",
             "{}", '"' + "w " * 400 + '"', "true"]


def malformed_request(rng: random.Random) -> tuple[str, bytes]:
    """A request that must be rejected: broken JSON, bad text, bad number, bad shape."""
    num, text = rng.choice(BAD_NUMBERS), rng.choice(BAD_TEXTS)
    options = [
        ("/v1/embeddings", f'{{"input": [{text}]}}'),
        ("/v1/embeddings", f'{{"input": ["ok", {text}], "model": "tiny"}}'),
        ("/v1/embeddings", f'{{"input": "ok", "dimensions": {num}}}'),
        ("/v1/embeddings", f'{{"input": {json.dumps(["w"] * 9)}}}'),
        ("/v1/embeddings", '{"input": "ok", "encoding_format": "int4"}'),
        ("/v1/embeddings", '{"input": "ok", "model": "other\\ud800"}'),
        ("/encode", f'{{"texts": [{text}], "sparse": true, "multivector": true}}'),
        ("/encode", f'{{"texts": ["ok"], "quantization": "int8", "int8_range": [{num}, 1]}}'),
        ("/encode", f'{{"texts": ["ok"], "quantization": "int8", "int8_range": [-1, {num}]}}'),
        ("/encode", '{"texts": ["ok"], "quantization": "int8", "int8_range": [1, -1]}'),
        ("/encode", '{"texts": ["ok"], "kind": "passage"}'),
        ("/rerank", f'{{"query": {text}, "documents": ["a"]}}'),
        ("/rerank", f'{{"query": "q", "documents": ["a", {text}]}}'),
        ("/rerank", f'{{"query": "q", "documents": ["a"], "weights": [{num}, 1, 1]}}'),
        ("/rerank", f'{{"query": "q", "documents": ["a"], "weights": {{"sparse": {num}}}}}'),
        ("/rerank", f'{{"query": "q", "documents": ["a"], "top_n": {num}}}'),
    ]
    route, raw = rng.choice(options)
    data = raw.encode()
    cut = rng.random()
    if cut < 0.1:  # truncated JSON
        data = data[:rng.randint(0, len(data) - 1)]
    elif cut < 0.15:  # bytes that are not UTF-8
        data = data[:5] + b"\xff\xfe\x80" + data[5:]
    return route, data


def test_fuzz_malformed_and_valid_from_concurrent_clients(fuzz_server, tiny_dir):
    from raylib.model import Encoder

    rng = random.Random(17)
    jobs = [("ok", *valid_request(rng)) for _ in range(N_VALID)]
    jobs += [("bad", *malformed_request(rng)) for _ in range(N_BAD)]
    rng.shuffle(jobs)
    ref = Encoder.from_pretrained(tiny_dir, device="cpu")

    async def run() -> list[tuple]:
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        done: list[tuple] = []
        async with httpx.AsyncClient(base_url=fuzz_server, timeout=120,
                                     limits=httpx.Limits(max_connections=CLIENTS)) as ac:
            async def worker():
                while not queue.empty():
                    kind, route, body = queue.get_nowait()
                    if kind == "ok":
                        r = await ac.post(route, json=body)
                    else:
                        r = await ac.post(route, content=body,
                                          headers={"Content-Type": "application/json"})
                    done.append((kind, route, body, r.status_code, r.content))
            await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(CLIENTS)]), 600)
        return done

    done = asyncio.run(run())
    assert len(done) == N_VALID + N_BAD
    server_errors = [(route, body, status, content[:200]) for kind, route, body, status, content
                     in done if status >= 500]
    assert not server_errors, server_errors[:5]
    for kind, route, body, status, content in done:
        payload = json.loads(content)  # every answer is JSON (strict: no NaN/Infinity)
        if kind == "ok":
            assert status == 200, (route, body, content[:300])
            _check_valid(route, body, payload, ref)
        else:
            assert 400 <= status < 500, (route, body, status)
            assert set(payload["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(fuzz_server + "/v1/embeddings", json={"input": "still alive"}, timeout=60)
    assert r.status_code == 200


def _check_valid(route: str, body: dict, payload: dict, ref) -> None:
    """Valid answers equal the in-process encoder: no batch neighbour changed them."""
    import base64

    if route == "/v1/embeddings":
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        want = ref.encode(texts, kind="document", dim=body.get("dimensions"))["dense"]
        for item in payload["data"]:
            emb = item["embedding"]
            got = (np.frombuffer(base64.b64decode(emb), "<f4") if isinstance(emb, str)
                   else np.asarray(emb, np.float32))
            np.testing.assert_allclose(got, want[item["index"]], atol=1e-5)
    elif route == "/encode" and body["quantization"] is None:
        want = ref.encode(body["texts"], kind=body["kind"])["dense"]
        np.testing.assert_allclose([row["dense"] for row in payload["data"]], want, atol=1e-5)
    elif route == "/rerank":
        scores = [x["relevance_score"] for x in payload["results"]]
        assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


@pytest.mark.parametrize("layout", ["split", "colocated"])  # split first: deployed for the fuzz test
def test_replica_killed_under_load_gives_200_or_503_never_500(layouts, layout):
    """Kill one of the two model replicas of a shipped layout (colocated: an Ingress replica, the
    HTTP server itself; split: a Batcher replica) while 16 keep-alive clients send valid requests:
    every request is answered 200 (re-sent to the survivor) or 503 + Retry-After; no 500, no
    connection closed without a response (issue 24). One exception is allowed: the one response
    the dying replica was writing may be cut after its headers (HAProxy had forwarded them)."""
    import ray

    url = layouts(layout)
    victim = "Ingress" if layout == "colocated" else "Batcher"
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{layout}#{victim}#")]
    assert len(replicas) == 2, replicas
    rng = random.Random(5)
    bodies = [{"input": [_text(rng) for _ in range(3)]} for _ in range(600)]
    killed_at: list[float] = []
    out: list[tuple] = []  # (status | "cut" | "no response: <error>", Retry-After, time)

    def kill_soon():  # after a sixth of the requests: mid-load however fast the server is
        deadline = time.perf_counter() + 300
        while len(out) < len(bodies) // 6 and time.perf_counter() < deadline:
            time.sleep(0.01)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
                 no_restart=True)
        killed_at.append(time.perf_counter())

    async def post(ac: httpx.AsyncClient, body: dict) -> tuple:
        try:
            async with ac.stream("POST", "/v1/embeddings", json=body) as r:
                try:
                    await r.aread()
                except httpx.HTTPError:  # the status line and headers came, the body did not
                    return "cut", None, time.perf_counter()
                return r.status_code, r.headers.get("Retry-After"), time.perf_counter()
        except httpx.HTTPError as exc:  # e.g. the connection closed without a response
            return f"no response: {type(exc).__name__}: {exc}", None, time.perf_counter()

    async def run() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=CLIENTS)) as ac:
            async def worker():
                while not queue.empty():
                    out.append(await post(ac, queue.get_nowait()))
            await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(CLIENTS)]), 600)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    asyncio.run(run())
    killer.join()
    codes = collections.Counter(c for c, _, _ in out)
    assert killed_at, "the replica was not killed"
    after = sum(1 for _, _, t in out if t > killed_at[0])
    assert after >= len(bodies) // 2, f"only {after} answers after the kill: it missed the load"
    assert set(codes) <= {200, 503, "cut"}, dict(codes)  # no 500, none closed unanswered
    assert all(ra for c, ra, _ in out if c == 503), "a 503 without Retry-After"
    assert codes[200] + codes[503] + codes["cut"] == len(bodies), dict(codes)
    assert codes["cut"] <= 1, dict(codes)  # the event loop writes one response at a time
    assert codes[200] >= 0.9 * len(bodies), dict(codes)
    print(f"replica kill ({layout}): {codes[200]} x 200, {codes[503]} x 503, {codes['cut']} cut "
          f"after the headers; {after} answered after the kill")
