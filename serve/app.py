"""Ray Serve app: the raylib Encoder (dense, sparse, multi-vector) and a hybrid reranker.

    serve run serve.app:app model=minilm max_batch_size=32      # from the repo root
    serve run serve/config.yaml

Deployments: `Encoder` (one model per replica, `@serve.batch` dynamic batching, GPU when
num_gpus > 0), `HybridReranker` (calls the Encoder through a handle; BGE-M3 §3.2 fusion of
dense, s_lex and s_mul scores), behind one FastAPI ingress with an OpenAI-compatible
/v1/embeddings, /encode, /rerank, /v1/models, /health and /metrics.

Capacity: each Encoder replica takes `max_ongoing_requests` calls; each caller queues at most
`max_queued_requests` more; beyond that the handle raises BackPressureError and the ingress
answers 503 + Retry-After with an OpenAI-style JSON body. The ingress also caps its own in-flight
requests (`ingress_max_ongoing_requests`, same 503); Serve's own proxy-level limit behind it
(4x that, plain-text 503 + Retry-After) is only a backstop.
"""

import asyncio
import base64
import collections
import hmac
import logging
import math
import os
import time
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _count_texts(items: list[dict]) -> int:
    """serve.batch batch_size_fn: a batch's size is its number of texts, not of calls."""
    return sum(len(item["texts"]) for item in items)


# ------------------------------------------------------------------------------- Encoder
@serve.deployment(name="Encoder", health_check_period_s=10)
class EncoderDeployment:
    """One raylib Encoder per replica; calls from all clients are batched by text count."""

    def __init__(self, args: dict):
        import torch

        from raylib.model import Encoder

        self.args = ServeArgs.model_validate(args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        device = "cuda" if self.args.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model = Encoder.from_pretrained(self.args.model, device=device)
        self.max_length = self.args.max_length or self.model.settings.max_length
        self.encode.set_max_batch_size(self.args.max_batch_size)
        self.encode.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.device = device

    def info(self) -> dict:
        """What the ingress needs to validate requests and describe the model."""
        colbert = self.model.colbert_linear
        return {"dim": self.model.dim, "has_sparse": self.model.has_sparse,
                "has_multivector": self.model.has_multivector,
                "multivector_dim": colbert.out_features if colbert is not None else None,
                "max_length": self.max_length, "device": self.device,
                "matryoshka_dims": list(self.model.settings.matryoshka_dims)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_count_texts)
    async def encode(self, items: list[dict]) -> list[dict]:
        """items[i] = {texts, kind, dense, sparse, multivector, dim}; mixed kinds/outputs allowed."""
        return await asyncio.to_thread(self._encode_items, items)

    def _encode_items(self, items: list[dict]) -> list[Any]:
        """Group the batch by (kind, outputs), one encode per group, then split per call."""
        from raylib.model import truncate_dims

        results: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, item in enumerate(items):
            key = (item["kind"], bool(item.get("dense", True)), bool(item.get("sparse")),
                   bool(item.get("multivector")))
            groups[key].append(i)
        for (kind, dense, sparse, multi), members in groups.items():
            texts = [t for i in members for t in items[i]["texts"]]
            try:
                out = self.model.encode(texts, kind=kind, dense=dense, sparse=sparse,
                                        multivector=multi, batch_size=len(texts),
                                        max_length=self.max_length)
                lengths = [len(ids) for ids in self.model.tokenize(
                    texts, kind, self.max_length, padding=False)["input_ids"]]
            except ValueError as exc:  # bad input in one call must not fail the others
                out = None
                error = exc
            start = 0
            for i in members:
                n = len(items[i]["texts"])
                if out is None:
                    results[i] = error
                    start += n
                    continue
                res: dict[str, Any] = {"n_tokens": lengths[start:start + n]}
                if dense:
                    emb = out["dense"][start:start + n]
                    dim = items[i].get("dim")
                    res["dense"] = truncate_dims(emb, dim).astype(np.float32) if dim else emb
                if sparse:
                    rows = out["sparse"][start:start + n]
                    res["sparse"] = rows
                    res["sparse_tokens"] = [
                        dict(zip(row, self.model.tokenizer.convert_ids_to_tokens(list(row))))
                        for row in rows]
                if multi:
                    res["multivector"] = out["multivector"][start:start + n]
                results[i] = res
                start += n
        return results

    def check_health(self) -> None:
        """A replica whose model is gone is restarted by Serve."""
        if self.model is None:
            raise RuntimeError("encoder not loaded")


# ------------------------------------------------------------------------------- reranker
@serve.deployment(name="HybridReranker")
class HybridReranker:
    """Scores documents for a query with weighted dense + lexical + late-interaction fusion."""

    def __init__(self, encoder: DeploymentHandle, args: dict):
        self.encoder = encoder
        self.args = ServeArgs.model_validate(args)
        self._info: Optional[dict] = None

    async def rerank(self, query: str, documents: list[str], weights: list[float]) -> dict:
        """Per-document dense, sparse, multivector and fused scores (None where the model lacks
        a head); fusion = sum_k w_k s_k / sum_k w_k over the available components."""
        from raylib.scoring import dense_scores, hybrid_scores, lexical_scores, multivector_scores

        if self._info is None:
            self._info = await self.encoder.info.remote()
        sparse, multi = self._info["has_sparse"], self._info["has_multivector"]
        dense = True
        use = [dense and weights[0] > 0, sparse and weights[1] > 0, multi and weights[2] > 0]
        flags = {"dense": dense, "sparse": sparse, "multivector": multi}
        step = self.args.max_batch_size
        calls = [self.encoder.encode.remote({"texts": [query], "kind": "query", **flags})]
        calls += [self.encoder.encode.remote({"texts": documents[s:s + step], "kind": "document",
                                              **flags})
                  for s in range(0, len(documents), step)]
        outs = await asyncio.gather(*calls)
        for out in outs:
            if isinstance(out, Exception):
                raise out
        q, docs = outs[0], outs[1:]
        scores: dict[str, Optional[np.ndarray]] = {"dense": None, "sparse": None, "multivector": None}
        scores["dense"] = dense_scores(q["dense"], np.concatenate([o["dense"] for o in docs]))[0]
        if sparse:
            d_sparse = [row for o in docs for row in o["sparse"]]
            scores["sparse"] = lexical_scores(q["sparse"], d_sparse)[0]
        if multi:
            d_multi = [m for o in docs for m in o["multivector"]]
            scores["multivector"] = multivector_scores(q["multivector"], d_multi)[0]
        fused = hybrid_scores(*(scores[k] if u else None for k, u in zip(scores, use)),
                              weights=weights)
        n_tokens = q["n_tokens"][0] + sum(sum(o["n_tokens"]) for o in docs)
        return {"hybrid": fused.tolist(),
                **{k: (v.tolist() if v is not None else None) for k, v in scores.items()},
                "unavailable": [k for k, v in scores.items() if v is None], "n_tokens": n_tokens}


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


@api.middleware("http")
async def _auth_limits_metrics(request: Request, call_next):
    """Bearer auth (all routes but /health), the ingress in-flight cap, and metrics."""
    start = time.perf_counter()
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route_prefix
        path = path[len(root):] or "/"
    route = path if path in ROUTES else "other"
    ingress = _INGRESS.get("replica")
    if ingress is None:  # not initialized yet: fail closed
        return error_response(503, "Server starting.", None, "starting", type="server_overloaded",
                              headers={"Retry-After": "1"})
    if ingress.api_key and path != "/health":
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  ingress.api_key.encode()):
            response = error_response(401, "Missing or invalid API key: send 'Authorization: "
                                           "Bearer <key>'.", None, "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            ingress.stats.record(route, 401, (time.perf_counter() - start) * 1e3)
            return response
    if ingress.in_flight >= ingress.args.ingress_max_ongoing_requests and path != "/health":
        response = ingress.overloaded("ingress at capacity")
    else:
        ingress.in_flight += 1
        try:
            response = await call_next(request)
        finally:
            ingress.in_flight -= 1
    ingress.stats.record(route, response.status_code, (time.perf_counter() - start) * 1e3)
    return response


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, limits, auth, OpenAI formatting; the work is done by handles."""

    def __init__(self, encoder: DeploymentHandle, reranker: DeploymentHandle, args: dict):
        self.encoder, self.reranker = encoder, reranker
        self.args = ServeArgs.model_validate(args)
        self.api_key = self.args.api_key or os.environ.get(API_KEY_ENV) or None
        self.model_name = self.args.served_model_name or os.path.basename(
            os.path.normpath(self.args.model))
        self.stats = _Stats()
        self.in_flight = 0
        self._info: Optional[dict] = None
        _register_ingress(self)

    # ---------------------------------------------------------------- helpers
    async def info(self) -> dict:
        if self._info is None:
            self._info = await self._call(self.encoder.info.remote())
        return self._info

    def overloaded(self, why: str) -> JSONResponse:
        return error_response(503, f"Server over capacity ({why}); retry after "
                                   f"{self.args.retry_after_s} s.", None, "over_capacity",
                              type="server_overloaded",
                              headers={"Retry-After": str(self.args.retry_after_s)})

    async def _call(self, response):
        """Await a handle response; backpressure -> 503 JSON, encoder ValueError -> 400."""
        try:
            return await response
        except BackPressureError as exc:
            raise APIError(503, f"Server over capacity: {exc.message} Retry after "
                                f"{self.args.retry_after_s} s.", None, "over_capacity",
                           type="server_overloaded",
                           headers={"Retry-After": str(math.ceil(self.args.retry_after_s))})
        except ValueError as exc:
            raise APIError(400, str(exc).splitlines()[-1], None, "invalid_value")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in (self.model_name, self.args.model):
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
                     multivector: bool = False, dim: Optional[int] = None) -> dict:
        """Split into max_batch_size chunks (Serve batches across requests), encode, merge."""
        step = self.args.max_batch_size
        flags = {"kind": kind, "dense": dense, "sparse": sparse, "multivector": multivector,
                 "dim": dim}
        outs = await asyncio.gather(*[
            self._call(self.encoder.encode.remote({"texts": texts[s:s + step], **flags}))
            for s in range(0, len(texts), step)])
        for out in outs:
            if isinstance(out, Exception):
                raise APIError(400, str(out), None, "invalid_value")
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
                emb = vec.tolist()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = int(sum(out["n_tokens"]))
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
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
            calibration = Int8Calibration(lo_a.copy(), ((hi_a - lo_a) / 255.0).astype(np.float32))
        out = await self.encode(texts, body.kind, body.dense, body.sparse, body.multivector, dim)
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
                    row["dense"] = v.tolist()
            result["dense_format"] = body.quantization or "float32"
            result["dimensions"] = out_dim
        if body.sparse:
            for row, weights, tokens in zip(data, out["sparse"], out["sparse_tokens"]):
                row["sparse"] = {"weights": {tokens[t]: w for t, w in weights.items()},
                                 "ids": {tokens[t]: int(t) for t in weights}}
        if body.multivector:
            for row, m in zip(data, out["multivector"]):
                row["multivector"] = m.tolist()
        result["data"] = data
        tokens_used = int(sum(out["n_tokens"]))
        result["usage"] = {"prompt_tokens": tokens_used, "total_tokens": tokens_used}
        return JSONResponse(result)

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
        out = await self._call(self.reranker.rerank.remote(body.query, documents, weights))
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
        return JSONResponse({
            "object": "rerank", "model": self.model_name, "results": results,
            "weights": dict(zip(("dense", "sparse", "multivector"), weights)),
            "unavailable": out["unavailable"],
            "usage": {"prompt_tokens": out["n_tokens"], "total_tokens": out["n_tokens"]}})


# ------------------------------------------------------------------------------- builder
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
    code = {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
    if args.autoscaling is not None:
        scaling: dict[str, Any] = {"autoscaling_config": args.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": args.num_replicas}
    # Serve needs max_ongoing_requests >= max_batch_size or batches stay small (RAY_NOTES).
    encoder = EncoderDeployment.options(
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **code},
        **scaling).bind(plain)
    reranker = HybridReranker.options(
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0.1, **code}).bind(encoder, plain)
    return Ingress.options(
        max_ongoing_requests=2 * args.ingress_max_ongoing_requests,
        max_queued_requests=4 * args.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": 0.1, **code}).bind(encoder, reranker, plain)
