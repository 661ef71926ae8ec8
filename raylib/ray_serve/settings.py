"""The Serve app's settings and their rules, in one place: `ServeArgs` (the application's `args`).
Its defaults are serve/config.yaml's (the CPU deployment); serve/config_gpu.yaml changes capacity
and placement only; the pipeline's serve step reads serve/config.yaml too (tests/test_serve.py
checks that they agree)."""

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylib.model import ModelSpec


class AutoscalingArgs(BaseModel):
    """Replica autoscaling of the Encoder deployment (Ray Serve's AutoscalingConfig subset)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)


class ServeArgs(BaseModel):
    """Arguments of `raylib.ray_serve.app:app` (`serve run raylib.ray_serve.app:app model=minilm max_batch_size=16`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Union[str, ModelSpec] = Field(
        "minilm", description="a raylib model name (minilm, me5-small), a local or s3:// dir, or a "
        "ModelSpec mapping (pooling, prefixes, trust_remote_code: false by default)")
    served_model_name: Optional[str] = Field(None, description="name in /v1/models; default: model")
    max_length: Optional[int] = Field(None, ge=8, description="token cap; default: the model's")
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch", description="raylib.backends backend of the Batcher replicas")
    # continuous batching: texts per forward pass; how long an idle model waits for a batch to
    # fill (0: start at once; under load batches fill while the previous one runs)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # Batcher replicas: a fixed count, or autoscaling when `autoscaling` is set
    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[AutoscalingArgs] = None
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Batcher replica (0: CPU)")
    num_cpus: float = Field(1.0, ge=0, description="CPU tokens per Batcher replica")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="intra-op threads per replica (torch or ONNX Runtime); default: "
                                "int(num_cpus) on CPU, at least 1")
    # auth: None disables it; the env var RAYLIB_SERVE_API_KEY is read when this is unset
    api_key: Optional[str] = None
    # limits (413 beyond them) and capacity (503 + Retry-After beyond them)
    max_inputs_per_request: int = Field(256, ge=1)
    max_chars_per_input: int = Field(20_000, ge=1)
    max_ongoing_requests: int = Field(64, ge=1, description="per Batcher replica")
    max_queued_requests: int = Field(256, ge=-1, description="per caller of the Encoder; -1: no cap")
    ingress_max_ongoing_requests: int = Field(256, ge=1,
                                              description="in-flight HTTP requests per ingress replica")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas; one serves ~1-2k "
                                                        "requests/s")
    retry_after_s: int = Field(1, ge=0)
    replica_retries: int = Field(2, ge=0, description="re-sends of a call whose replica died")
    colocate: bool = Field(True, description="model inside the ingress replicas: one hop fewer "
                                             "per request; a lost replica's requests are re-sent "
                                             "by HAProxy (app.REPLICA_LOSS_ENV)")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.autoscaling and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        # Serve's @serve.batch-style batching needs the calls of a batch in flight at once
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"max_batch_size ({self.max_batch_size}), or batches stay small")
        return self


def deploy_args(path: str | Path) -> ServeArgs:
    """The ServeArgs of a Serve deploy config's (serve/config.yaml's) first application."""
    import yaml

    return ServeArgs.model_validate(yaml.safe_load(Path(path).read_text())["applications"][0]["args"])
