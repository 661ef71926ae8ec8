"""The Serve app's routes: the FastAPI `Ingress` with an OpenAI-compatible /v1/embeddings,
/encode, /rerank (BGE-M3 §3.2 fusion of dense, s_lex and s_mul scores, computed here),
/v1/models, /health and /metrics. It validates and limits requests, calls the batcher through a
handle (a lost batcher replica is retried, then answered 503 + Retry-After) and formats answers."""

import asyncio
import base64
import logging
import math
import os
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  ReplicaUnavailableError)
from ray.serve.handle import DeploymentHandle

from raylib.model import ModelSpec
from raylib.ray_serve.batcher import Batcher, LocalHandle
from raylib.ray_serve.errors import APIError, add_error_handlers, error_response
from raylib.ray_serve.middleware import AuthLimitsMetrics, FastJSONResponse, Stats, register_ingress
from raylib.ray_serve.schemas import EmbeddingsRequest, EncodeRequest, RerankRequest, RerankWeights
from raylib.ray_serve.settings import ServeArgs

logger = logging.getLogger("ray.serve")
API_KEY_ENV = "RAYLIB_SERVE_API_KEY"

api = FastAPI(title="raylib-embed", description="Encoder + hybrid reranker on Ray Serve")
add_error_handlers(api)
api.add_middleware(AuthLimitsMetrics)


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, limits, auth, OpenAI formatting; the work is done by handles."""

    def __init__(self, encoder: Optional[DeploymentHandle], args: dict):
        self.args = ServeArgs.model_validate(args)
        # colocate: the model lives in this process (one hop fewer per request); should the
        # replica die, HAProxy re-sends its requests to another (app.REPLICA_LOSS_ENV)
        self.encoder = encoder if encoder is not None else LocalHandle(
            Batcher.func_or_class(args))
        self.api_key = self.args.api_key or os.environ.get(API_KEY_ENV) or None
        self.model_name = self.args.served_model_name or os.path.basename(
            os.path.normpath(ModelSpec.of(self.args.model).name_or_path))
        self.stats = Stats()
        self.in_flight = 0
        self._info: Optional[dict] = None
        register_ingress(self)

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
        """Split into max_batch_size chunks (the batcher batches them with other requests' calls), encode, merge."""
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
