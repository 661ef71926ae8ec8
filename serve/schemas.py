"""Typed arguments of the Serve app and the JSON bodies of its routes (pydantic models)."""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylib.model import ModelSpec


# Numbers in requests: finite and in a range whose float32 arithmetic stays finite.
Bound = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class AutoscalingArgs(BaseModel):
    """Replica autoscaling of the Encoder deployment (Ray Serve's AutoscalingConfig subset)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)


class ServeArgs(BaseModel):
    """Arguments of `serve.app:app` (`serve run serve.app:app model=minilm max_batch_size=16`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Union[str, ModelSpec] = Field(
        "minilm", description="a raylib model name (minilm, me5-small), a local or s3:// dir, or a "
        "ModelSpec mapping (pooling, prefixes, trust_remote_code: false by default)")
    served_model_name: Optional[str] = Field(None, description="name in /v1/models; default: model")
    max_length: Optional[int] = Field(None, ge=8, description="token cap; default: the model's")
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch", description="raylib.onnx_backend backend of the Encoder replicas")
    # continuous batching: texts per forward pass; how long an idle model waits for a batch to
    # fill (0: start at once; under load batches fill while the previous one runs)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # Encoder replicas: a fixed count, or autoscaling when `autoscaling` is set
    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[AutoscalingArgs] = None
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Encoder replica (0: CPU)")
    num_cpus: float = Field(1.0, ge=0, description="CPU tokens per Encoder replica")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="intra-op threads per replica (torch or ONNX Runtime); default: "
                                "int(num_cpus) on CPU, at least 1")
    # auth: None disables it; the env var RAYLIB_SERVE_API_KEY is read when this is unset
    api_key: Optional[str] = None
    # limits (413 beyond them) and capacity (503 + Retry-After beyond them)
    max_inputs_per_request: int = Field(256, ge=1)
    max_chars_per_input: int = Field(20_000, ge=1)
    max_ongoing_requests: int = Field(64, ge=1, description="per Encoder replica")
    max_queued_requests: int = Field(256, ge=-1, description="per caller of the Encoder; -1: no cap")
    ingress_max_ongoing_requests: int = Field(256, ge=1,
                                              description="in-flight HTTP requests per ingress replica")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas; one serves ~1-2k "
                                                        "requests/s")
    retry_after_s: int = Field(1, ge=0)
    replica_retries: int = Field(2, ge=0, description="re-sends of a call whose replica died")
    colocate: bool = Field(False, description="model inside the ingress replicas: one hop fewer "
                                              "per request, but no re-send when a replica dies")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.autoscaling and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        return self


class EmbeddingsRequest(BaseModel):
    """OpenAI POST /v1/embeddings body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    dimensions: Optional[int] = Field(None, ge=-2**31, le=2**31)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    # extension (as Voyage/Cohere): which prefix the Encoder adds; OpenAI has no such notion
    input_type: Literal["query", "document"] = "document"


class EncodeRequest(BaseModel):
    """POST /encode body: the M3 outputs of a list of texts."""

    model_config = ConfigDict(extra="forbid")

    texts: Union[str, list[str]]
    kind: Literal["query", "document"] = "document"
    dense: bool = True
    sparse: bool = False
    multivector: bool = False
    dimensions: Optional[int] = Field(None, ge=-2**31, le=2**31)
    quantization: Optional[Literal["int8", "binary"]] = None
    # MCLS (M3 App. B.2): dense = mean of a CLS inserted every N tokens (paper: 256); torch backend
    mcls: Optional[int] = Field(None, ge=1, le=2**31)
    # int8 calibration: scalar or per-dimension [lo, hi]; default [-1, 1] (normalized vectors)
    int8_range: Optional[tuple[Union[Bound, list[Bound]], Union[Bound, list[Bound]]]] = None


class RerankWeights(BaseModel):
    """Fusion weights of dense, lexical (s_lex) and multi-vector (s_mul) scores (M3 §3.2)."""

    model_config = ConfigDict(extra="forbid")

    dense: Weight = 0.4
    sparse: Weight = 0.2
    multivector: Weight = 0.4


class RerankRequest(BaseModel):
    """POST /rerank body (Cohere/Jina-like)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    query: str
    documents: list[str]
    model: Optional[str] = None
    weights: Optional[Union[RerankWeights, tuple[Weight, Weight, Weight]]] = None
    top_n: Optional[int] = Field(None, ge=1, le=2**31)
    return_documents: bool = False
