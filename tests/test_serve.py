"""Ray Serve app over real HTTP on loopback: OpenAI embeddings, /encode, /rerank, errors, auth,
backpressure, and a bounded load test. Three apps share one Serve instance on a free port, behind
the shipped fast ingress (HAProxy + direct ingress, raylib.ray_serve.app.start_serve): `embed` (tiny BERT
with M3 heads, API key, torch backend, the model inside the ingress as serve/config.yaml deploys
it) at /, the same on the onnx-int8 backend with the model in its own Encoder deployment (the
ingress calls it over gRPC) at /int8 (the API tests run against both), and `tight` (tiny model
without heads, tiny capacity, onnx fp32 backend, Encoder deployment) at /tight."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import random
import time

import numpy as np
import pytest
from raylib.ports import free_port

httpx = pytest.importorskip("httpx")

API_KEY = "test-key-123"
BACKENDS = {"torch": "", "onnx-int8": "/int8"}  # backend -> route prefix of its `embed` app
# served vs in-process torch vectors: fp32 backends agree to float rounding; int8 weights move
# normalized vectors by about 1e-3 per coordinate on the tiny model
ATOL = {"torch": 1e-5, "onnx-int8": 2e-2}
TEXTS = [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta", "retrieval", "ray"][j % 6]
                                     for j in range(1 + (i * 7) % 23)) for i in range(40)]



@pytest.fixture(scope="module")
def server(ray_session, tiny_dir, tmp_path_factory):
    """Start Serve on 127.0.0.1:<free port> with both apps; tear down only what we started."""
    from ray import serve

    from raylib.tiny import save_tiny_encoder
    from raylib.ray_serve.app import app, start_serve

    plain_dir = save_tiny_encoder(tmp_path_factory.mktemp("tiny_plain") / "model", m3_heads=False)
    port = free_port()
    start_serve(port=port, drain_s=1)  # the shipped fast ingress (HAProxy + direct ingress)
    targets = [serve.RunTarget(app({"model": str(tiny_dir), "served_model_name": "tiny", "num_cpus": 0.25,
                                    "max_batch_size": 8, "batch_wait_timeout_s": 0.02, "api_key": API_KEY,
                                    "max_inputs_per_request": 16, "max_chars_per_input": 400,
                                    "backend": backend, "colocate": backend == "torch"}),
                               name=f"embed-{backend}", route_prefix=prefix or "/")
               for backend, prefix in BACKENDS.items()]
    targets.append(serve.RunTarget(
        app({"model": str(plain_dir), "served_model_name": "plain", "num_cpus": 0.25,
             "max_batch_size": 2, "batch_wait_timeout_s": 0.5, "max_ongoing_requests": 2,
             "max_queued_requests": 2, "retry_after_s": 2, "backend": "onnx", "colocate": False}),
        name="tight", route_prefix="/tight"))
    serve.run_many(targets)  # the apps' replicas start side by side, not one app after another
    yield {"base": f"http://127.0.0.1:{port}", "plain_dir": plain_dir}
    for backend in BACKENDS:
        serve.delete(f"embed-{backend}")
    serve.delete("tight")
    serve.shutdown()


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def base(server, backend) -> str:
    return server["base"] + BACKENDS[backend]


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The same model in-process: what every served vector must equal."""
    from raylib.model import Encoder

    return Encoder.from_pretrained(tiny_dir, device="cpu")


def _assert_error(resp, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# ----------------------------------------------------------------------------- basics
def test_health_models_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["dimensions"] == 32 and models["data"][0]["sparse"] is True
    before = client.get("/metrics").json()["requests_total"]
    client.get("/health")
    metrics = client.get("/metrics").json()
    assert metrics["requests_total"] >= before + 2
    assert metrics["routes"]["/health"]["latency_ms"]["p50"] >= 0


def test_embeddings_equal_in_process_encode_under_concurrent_batching(client, reference, backend):
    """Random request sizes from 8 threads: Serve batches them differently from the reference."""
    want = reference.encode(TEXTS, kind="document")["dense"]
    rng = random.Random(0)
    chunks, start = [], 0
    while start < len(TEXTS):
        n = rng.randint(1, 6)
        chunks.append((start, TEXTS[start:start + n]))
        start += n

    def call(chunk):
        start, texts = chunk
        fmt = "base64" if start % 2 else "float"
        r = client.post("/v1/embeddings", json={"input": texts, "model": "tiny",
                                                "encoding_format": fmt})
        assert r.status_code == 200, r.text
        return start, fmt, r.json()

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, chunks * 2))
    for start, fmt, body in results:
        assert body["object"] == "list" and body["model"] == "tiny"
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        for item in body["data"]:
            assert item["object"] == "embedding"
            emb = item["embedding"]
            got = (np.frombuffer(base64.b64decode(emb), dtype="<f4") if fmt == "base64"
                   else np.asarray(emb, dtype=np.float32))
            np.testing.assert_allclose(got, want[start + item["index"]], atol=ATOL[backend])


def test_openai_client_with_and_without_dimensions(base, reference, backend):
    openai = pytest.importorskip("openai")
    from raylib.encoding import truncate_dims

    oa = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    atol = ATOL[backend]
    texts = TEXTS[:5]
    want = reference.encode(texts, kind="document")["dense"]
    full = oa.embeddings.create(model="tiny", input=texts)  # client asks for base64 itself
    got = np.asarray([d.embedding for d in full.data], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=atol)
    assert full.usage.prompt_tokens == sum(
        len(ids) for ids in reference.tokenize(texts, "document", padding=False)["input_ids"])
    short = oa.embeddings.create(model="tiny", input=texts[0], dimensions=8,
                                 encoding_format="float")
    vec = np.asarray(short.data[0].embedding, dtype=np.float32)
    assert vec.shape == (8,)
    np.testing.assert_allclose(vec, truncate_dims(want[:1], 8)[0], atol=atol)
    np.testing.assert_allclose(np.linalg.norm(vec), 1.0, atol=1e-5)
    with pytest.raises(openai.BadRequestError):
        oa.embeddings.create(model="tiny", input="x", dimensions=33)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong",
                      max_retries=0).embeddings.create(model="tiny", input="x")


# ----------------------------------------------------------------------------- /encode
def test_encode_sparse_multivector_and_quantization(client, reference, backend):
    from raylib.quantization import Int8Calibration, quantize_binary

    texts = ["the cat sat on the mat", "ray serve batches requests"]
    want = reference.encode(texts, kind="query", dense=True, sparse=True, multivector=True)
    r = client.post("/encode", json={"texts": texts, "kind": "query", "sparse": True,
                                     "multivector": True})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    atol = ATOL[backend]
    for i, row in enumerate(data):
        np.testing.assert_allclose(row["dense"], want["dense"][i], atol=atol)
        ids = row["sparse"]["ids"]
        assert set(ids) == set(row["sparse"]["weights"])
        assert {v: row["sparse"]["weights"][k] for k, v in ids.items()} == pytest.approx(
            want["sparse"][i], abs=atol)
        for token, tid in ids.items():
            assert reference.tokenizer.convert_ids_to_tokens(tid) == token
        np.testing.assert_allclose(np.asarray(row["multivector"]), want["multivector"][i],
                                   atol=atol)
    r = client.post("/encode", json={"texts": texts, "quantization": "int8", "dimensions": 16})
    body = r.json()
    dense16 = reference.encode(texts, kind="document", dim=16)["dense"]
    cal = Int8Calibration(np.full(16, -1.0, np.float32), np.full(16, 2 / 255, np.float32))
    assert body["dense_format"] == "int8" and body["dimensions"] == 16
    got = np.asarray([row["dense"] for row in body["data"]])
    slack = 1 + int(atol * 255 / 2 + 0.5)  # a bin edge at most (+ the backend's own error)
    assert np.abs(got - cal.quantize(dense16)).max() <= slack
    assert np.abs(cal.dequantize(got.astype(np.int8)) - dense16).max() <= 2 / 255 + atol
    r = client.post("/encode", json={"texts": texts, "quantization": "binary"})
    want_bits = quantize_binary(reference.encode(texts, kind="document")["dense"])
    bits = np.asarray([row["dense"] for row in r.json()["data"]])
    if backend == "torch":
        assert np.array_equal(bits, want_bits)
    else:  # coordinates within the int8 error of 0 may flip sign
        assert bits.shape == want_bits.shape and (bits != want_bits).mean() < 0.1
    r = client.post("/encode", json={"texts": texts, "quantization": "int8",
                                     "int8_range": [-0.5, 0.5]})
    assert r.status_code == 200 and r.json()["int8_range"][0][0] == -0.5
    r = client.post("/encode", json={"texts": texts, "mcls": 2})  # MCLS (M3 App. B.2)
    if backend == "torch":
        assert r.status_code == 200, r.text
        want_mcls = reference.encode(texts, kind="document", mcls=2)["dense"]
        np.testing.assert_allclose([row["dense"] for row in r.json()["data"]], want_mcls, atol=atol)
        assert np.abs(want_mcls - reference.encode(texts, kind="document")["dense"]).max() > 1e-3
    else:  # the ONNX graphs give pooled vectors only
        _assert_error(r, 400, "mcls")


# ----------------------------------------------------------------------------- /rerank
def test_rerank_components_match_scoring(client, reference, backend):
    from raylib.scoring import hybrid_scores, score_encoded

    query = "alpha retrieval"
    docs = TEXTS[:11]
    r = client.post("/rerank", json={"query": query, "documents": docs, "top_n": 5,
                                     "return_documents": True,
                                     "weights": {"dense": 1, "sparse": 0.3, "multivector": 1}})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 5 and body["unavailable"] == []
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    q = reference.encode([query], kind="query", sparse=True, multivector=True)
    d = reference.encode(docs, kind="document", sparse=True, multivector=True)
    want = score_encoded(q, d, weights=(1, 0.3, 1))
    atol = ATOL[backend]
    if backend == "torch":
        assert results[0]["index"] == int(np.argmax(want["hybrid"][0]))
    for x in results:
        i = x["index"]
        assert x["document"]["text"] == docs[i]
        for k in ("dense", "sparse", "multivector"):
            assert x["scores"][k] == pytest.approx(float(want[k][0, i]), abs=max(1e-4, 10 * atol))
        fused = hybrid_scores(*(np.float32(x["scores"][k]) for k in ("dense", "sparse",
                                                                      "multivector")),
                              weights=(1, 0.3, 1))
        assert x["relevance_score"] == pytest.approx(float(fused), abs=1e-5)


def test_rerank_without_m3_heads_fuses_dense_only(server):
    # two documents: one Batcher call of max_batch_size 2 texts plus the query's, inside the tight
    # app's 2 ongoing + 2 queued (three documents made three calls, and a slow one could overflow)
    r = httpx.post(server["base"] + "/tight/rerank", timeout=60,
                   json={"query": "q", "documents": ["a b", "c d"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unavailable"] == ["sparse", "multivector"]
    for x in body["results"]:
        assert x["scores"]["sparse"] is None and x["scores"]["multivector"] is None
        assert x["relevance_score"] == pytest.approx(x["scores"]["dense"], abs=1e-6)
    err = httpx.post(server["base"] + "/tight/rerank", timeout=60,
                     json={"query": "q", "documents": ["a"], "weights": [0, 1, 1]})
    _assert_error(err, 400, "weights")
    err = httpx.post(server["base"] + "/tight/encode", timeout=60,
                     json={"texts": ["a"], "sparse": True})
    _assert_error(err, 400, "sparse")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/embeddings", {"model": "tiny"}, 400, "input"),                      # missing field
    ("/v1/embeddings", {"input": 5}, 400, "input"),                              # wrong type
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "input.1"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, 400, "input.0"),                 # token arrays
    ("/v1/embeddings", {"input": "x", "dimensions": 33}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int4"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "model": "gpt-9"}, 404, "model"),
    ("/v1/embeddings", {"input": ["x"] * 17}, 413, "input"),
    ("/v1/embeddings", {"input": ["x" * 401]}, 413, "input.0"),
    ("/encode", {"texts": ["a"], "kind": "passage"}, 400, "kind"),
    ("/encode", {"texts": ["a"], "dense": False}, 400, "dense"),
    ("/encode", {"texts": ["a"], "quantization": "int4"}, 400, "quantization"),
    ("/encode", {"texts": ["a"], "quantization": "int8", "int8_range": [[0, 1], 0]}, 400,
     "int8_range"),
    ("/encode", {"texts": ["a"], "typo": 1}, 400, "typo"),
    ("/encode", {"texts": ["a"], "mcls": 0}, 400, "mcls"),
    ("/encode", {"texts": ["a"], "mcls": 256, "sparse": True}, 400, "mcls"),
    ("/rerank", {"query": "q", "documents": []}, 400, "documents"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("/rerank", {"query": "", "documents": ["a"]}, 400, "query.0"),
])
def test_malformed_requests_get_openai_errors(client, path, body, status, param):
    _assert_error(client.post(path, json=body), status, param)


def test_invalid_json_unknown_route_and_method(client):
    err = _assert_error(client.post("/v1/embeddings", content=b"{not json",
                                    headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    _assert_error(client.get("/nope"), 404)
    _assert_error(client.get("/v1/embeddings"), 405)


def test_auth(base):
    assert httpx.get(base + "/health").status_code == 200  # health stays open for probes
    err = _assert_error(httpx.post(base + "/v1/embeddings", json={"input": "x"}), 401)
    assert err["code"] == "invalid_api_key"
    _assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(base + "/v1/models",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


# ----------------------------------------------------------------------------- capacity
def test_overload_gets_503_with_retry_after_and_recovers(server):
    """`tight`: 2 ongoing + 2 queued Batcher calls of at most 2 texts (a request of 3 texts is 2
    calls), and each batch waits 0.5 s to fill, so a burst of 48 concurrent requests must
    overflow; none may hang or 500."""
    url = server["base"] + "/tight/v1/embeddings"
    body = {"input": [f"burst text number {i} " * 20 for i in range(3)]}
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        with cf.ThreadPoolExecutor(48) as pool:
            responses = list(pool.map(lambda _: c.post(url, json=body), range(48)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                err = _assert_error(r, 503)
                assert err["code"] == "over_capacity"
                assert r.headers["Retry-After"] == "2"
        time.sleep(0.5)
        assert c.post(url, json=body).status_code == 200


@pytest.mark.slow
def test_bounded_load_no_5xx_and_alive_after(server, client):
    """Scaled-down issue load test (bench/serve_bench.py --load runs 2,000 + 500): concurrent
    valid requests plus malformed ones; only 200, 4xx, or deliberate 503s."""
    import asyncio

    n_valid = int(os.environ.get("RAYLIB_SERVE_LOAD_N", "400"))
    n_bad = n_valid // 4
    clients = 32
    bad_bodies = [{"input": []}, {"input": 3}, {"inpt": "x"}, {"input": "x", "dimensions": 999},
                  {"input": ["x" * 1000]}, {"input": [None]}]

    async def run() -> list[int]:
        jobs = [("ok", i) for i in range(n_valid)] + [("bad", i) for i in range(n_bad)]
        random.Random(1).shuffle(jobs)
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        codes: list[int] = []
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server["base"], timeout=60, headers=headers,
                                     limits=httpx.Limits(max_connections=clients)) as ac:
            async def worker():
                while not queue.empty():
                    kind, i = queue.get_nowait()
                    if kind == "ok":
                        r = await ac.post("/v1/embeddings", json={"input": TEXTS[i % 40]})
                        codes.append(r.status_code)
                    elif i % 7 == 0:
                        r = await ac.post("/v1/embeddings", content=b"\x00garbage",
                                          headers={"Content-Type": "application/json"})
                        codes.append(-r.status_code)
                    else:
                        r = await ac.post("/v1/embeddings", json=bad_bodies[i % len(bad_bodies)])
                        codes.append(-r.status_code)
            await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(clients)]), 240)
        return codes

    start = time.perf_counter()
    codes = asyncio.run(run())
    elapsed = time.perf_counter() - start
    ok = [c for c in codes if c > 0]
    bad = [-c for c in codes if c < 0]
    assert len(ok) == n_valid and len(bad) == n_bad
    assert set(ok) <= {200, 503}, sorted(set(ok))
    assert ok.count(200) >= 0.9 * n_valid, (ok.count(200), ok.count(503))
    assert all(400 <= c < 500 for c in bad), sorted(set(bad))
    assert client.get("/health").status_code == 200
    r = client.post("/v1/embeddings", json={"input": "still alive"})
    assert r.status_code == 200
    print(f"load: {n_valid} valid + {n_bad} malformed from {clients} clients in {elapsed:.1f}s")


# ----------------------------------------------------------------------------- bad input (issue 18)
@pytest.mark.parametrize("path,raw,param", [
    ("/v1/embeddings", '{"input": "ok \\ud800 text"}', "input.0"),               # lone surrogate
    ("/v1/embeddings", '{"input": ["fine", "\\udfff"]}', "input.1"),
    ("/encode", '{"texts": ["a \\udbff"], "sparse": true}', "texts.0"),
    ("/rerank", '{"query": "\\ud800", "documents": ["a"]}', "query.0"),
    ("/rerank", '{"query": "q", "documents": ["a", "b\\ud83d"]}', "documents.1"),
    ("/encode", '{"texts": ["a"], "quantization": "int8", "int8_range": [-1e39, 1e39]}',
     "int8_range"),
    ("/encode", '{"texts": ["a"], "quantization": "int8", "int8_range": [-Infinity, Infinity]}',
     "int8_range"),
    ("/encode", '{"texts": ["a"], "quantization": "int8", "int8_range": [NaN, 1]}', "int8_range"),
    ("/encode", '{"texts": ["a"], "quantization": "int8", "int8_range": [0, 1e-9]}', "int8_range"),
    ("/rerank", '{"query": "q", "documents": ["a"], "weights": [1e39, 1, 1]}', "weights"),
    ("/rerank", '{"query": "q", "documents": ["a"], "weights": {"dense": Infinity}}', "weights"),
    ("/rerank", '{"query": "q", "documents": ["a"], "weights": [NaN, 1, 1]}', "weights"),
    ("/rerank", '{"query": "q", "documents": ["a"], "top_n": 1e400}', "top_n"),
    ("/v1/embeddings", '{"input": "x", "dimensions": 1e39}', "dimensions"),
    ("/v1/embeddings", '{"input": "x", "dimensions": 100000000000000000000000}', "dimensions"),
])
def test_surrogates_and_non_finite_numbers_are_400(client, path, raw, param):
    r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    _assert_error(r, 400, param)


def test_lone_surrogate_in_the_model_name_is_echoed_as_valid_json(client):
    r = client.post("/v1/embeddings", content=b'{"input": "x", "model": "m\\ud800"}',
                    headers={"Content-Type": "application/json"})
    err = _assert_error(r, 404, "model")
    assert "\\ud800" in err["message"]


def test_one_bad_call_in_a_batch_never_fails_the_others(tiny_dir, reference):
    """The replica's batch function, in-process: a call whose text the tokenizer rejects (a lone
    surrogate that got past the ingress) gets its own 400; the calls batched with it succeed."""
    from raylib.ray_serve.batcher import Batcher

    replica = Batcher.func_or_class({"model": str(tiny_dir), "num_cpus": 1})
    good = [{"texts": TEXTS[:2], "kind": "document", "dim": 8},
            {"texts": TEXTS[5:6], "kind": "document", "sparse": True}]
    bad = {"texts": ["fine", "bad \ud800"], "kind": "document"}
    items = [good[0], bad, good[1], {**bad, "sparse": True}]
    out = replica._encode_items(items)
    assert out[1]["status"] == 400 and out[3]["status"] == 400
    assert out[1]["code"] == "invalid_value"
    want = reference.encode(TEXTS[:2], kind="document", dim=8)["dense"]
    np.testing.assert_allclose(out[0]["dense"], want, atol=1e-5)
    assert out[0]["n_tokens"] == [len(x) for x in reference.tokenize(
        TEXTS[:2], "document", padding=False)["input_ids"]]
    assert out[2]["sparse"][0] == pytest.approx(
        reference.encode(TEXTS[5:6], sparse=True)["sparse"][0], abs=1e-5)


def test_take_batch_oldest_first_then_nearest_lengths_within_limit():
    """Continuous batching's selection: the oldest call always goes (no starvation), the rest
    are the calls nearest to it in length, never past max_batch_size texts, others keep order."""
    import collections

    from raylib.ray_serve.batcher import take_batch

    def call(name, *lengths):
        return ({"texts": ["x" * n for n in lengths]}, name)

    pending = collections.deque([call("old", 100), call("a", 10), call("b", 95), call("c", 300),
                                 call("d", 104, 90), call("e", 99), call("f", 11)])
    batch = take_batch(pending, limit=4)
    assert [c[1] for c in batch] == ["old", "e", "d"]  # distances 1, 4 (2 texts); b's 5 is full
    assert [c[1] for c in pending] == ["a", "b", "c", "f"]
    assert [c[1] for c in take_batch(pending, limit=3)] == ["a", "f", "b"]
    assert [c[1] for c in pending] == ["c"]
    big = collections.deque([call("huge", *[5] * 9), call("g", 5)])
    assert [c[1] for c in take_batch(big, limit=8)] == ["huge"] and len(big) == 1
    # a random pool: every call is taken exactly once, oldest first each time, within the limit
    rng = np.random.default_rng(0)
    calls = [call(i, *rng.integers(1, 400, rng.integers(1, 4))) for i in range(200)]
    pool, seen = collections.deque(calls), []
    while pool:
        oldest = pool[0][1]
        batch = take_batch(pool, limit=8)
        assert batch[0][1] == oldest
        assert len(batch) == 1 or sum(len(c[0]["texts"]) for c in batch) <= 8
        seen += [c[1] for c in batch]
    assert sorted(seen) == list(range(200))


def test_deploy_configs_validate():
    """serve/config.yaml and serve/config_gpu.yaml: Serve's deploy schema and our ServeArgs."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from raylib.ray_serve.app import FAST_INGRESS_ENV
    from raylib.ray_serve.settings import ServeArgs, deploy_args

    root = Path(__file__).resolve().parents[1]
    # ServeArgs' defaults are the CPU deploy config's args: one home for the settings
    assert deploy_args(root / "serve" / "config.yaml") == ServeArgs()
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeArgs(max_batch_size=16, max_ongoing_requests=8)
    for name in ("config.yaml", "config_gpu.yaml"):
        config = yaml.safe_load((root / "serve" / name).read_text())
        ServeDeploySchema.model_validate(config)
        args = ServeArgs.model_validate(config["applications"][0]["args"])
        assert args.max_ongoing_requests >= args.max_batch_size
        # the fast ingress the tests and benches start (start_serve) is what the configs deploy
        env = config["controller_options"]["runtime_env"]["env_vars"]
        assert FAST_INGRESS_ENV.items() <= env.items(), name
    gpu = ServeArgs.model_validate(yaml.safe_load((root / "serve" / "config_gpu.yaml").read_text())
                                   ["applications"][0]["args"])
    assert gpu.num_gpus > 0 and gpu.backend == "torch"
    assert not gpu.colocate  # the GPU layout keeps the Batcher apart (ServeArgs' default: True)


def test_http_port_is_haproxy_in_front_of_direct_ingress_replicas(server):
    """start_serve's mode is live: an HAProxyManager actor runs and the port answers /health,
    while Serve's Python proxy actor is not in the request path (no HAProxy, no fast ingress)."""
    from ray.util.state import list_actors

    alive = {a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)}
    assert "HAProxyManager" in alive, sorted(alive)
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200
