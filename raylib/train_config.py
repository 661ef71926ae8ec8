"""The config sections every training job has (pretrain, finetune): plain dataclasses, no Ray.

Jobs (raylib/jobs/pretrain.py, finetune.py) add their objective as a section of its own; the Ray
Train loop (raylib/ray_train/loop.py) reads these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylib.model import ModelSpec
from raylib.tracking import TrackingSection


@dataclass
class ModelSection:
    """Starting checkpoint: a model dir or name (minilm, me5-small), or `tiny` (raylib.tiny)."""

    name_or_path: str | ModelSpec = "minilm"  # or a ModelSpec mapping (pooling, prefixes, trust_remote_code)
    tiny: dict = field(default_factory=dict)         # kwargs of raylib.tiny.tiny_encoder when name is tiny
    activation_checkpointing: bool = False            # backbone.gradient_checkpointing_enable()
    matryoshka_dims: list[int] = field(default_factory=list)  # written into the saved settings
    m3_heads: bool = False  # attach fresh sparse + multi-vector heads (M3 §3.2) if the checkpoint has none


@dataclass
class DataSection:
    """Pairs (Parquet or JSONL; local or s3://), prepared once into pre-tokenized per-source shards
    (raylib.jobs.prepare), batched per source (x language, x length bucket), seeded order."""

    paths: list[str] = field(default_factory=list)
    format: str = "parquet"
    global_batch_size: int = 32
    source_batch_sizes: dict = field(default_factory=dict)  # {source key or ending: global batch size}
    epochs: int = 1
    seed: int = 0
    prepared: str = ""          # prepared data (manifest dir); empty: <run output>/prepared from paths
    length_bounds: list[int] = field(default_factory=list)  # M3 §3.4 length buckets (token bounds)
    row_group_rows: int = 1024  # prepared shards' row group (about one worker's rows of a step)
    partition_mib: float = 256    # input MiB per key range of the prepare stage (write task memory)
    prefetch: int = 2           # steps each worker reads ahead in a background thread


@dataclass
class TrainSection:
    """Optimizer, schedule, gradient caching, precision, logging."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup: float = 0.0        # steps (integer) or a fraction of all steps (0 < x < 1)
    decay: float = 0.0         # linear decay over the last steps (integer) or fraction
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int = 0          # 0: all epochs
    grad_cache_chunk: int = 0   # rows per chunk for gradient caching; 0 = one plain forward/backward
    bf16: bool = True           # autocast on GPU (no effect on CPU)
    seed: int = 0               # weights of a tiny model, dropout
    torch_threads: int = 0      # torch.set_num_threads in each worker (0: Ray's default)
    log_every: int = 1
    peak_tflops: float = 989.0  # per GPU, for the MFU estimate (H100 SXM dense bf16)
    fail_at_step: int = -1      # test switch: raise once in rank 0 at this step (worker failure)
    log_consumed: bool = False  # write consumed_rank{r}.jsonl (row ids per step) to the run dir


@dataclass
class CheckpointSection:
    """Where checkpoints go (local dir or s3://) and how often."""

    storage_path: str = "runs"
    name: str = "pretrain"
    every_steps: int = 100
    num_to_keep: int = 2
    local_dir: str = ""         # rank 0's scratch for metrics.jsonl when storage_path is remote
                                # ("": a node-local temp dir; published to storage at the end)


@dataclass
class EvalSection:
    """Retrieval evaluation during training, on rank 0 (the other ranks wait at the report
    barrier): a BEIR dir (local or s3://) or a held-out fraction of the prepared training rows.
    Every evaluation reports a checkpoint; Ray Train keeps the best `checkpoint.num_to_keep` by
    `eval/<head>/<metric>` (CheckpointConfig checkpoint_score_attribute/order)."""

    every_n_steps: int = 0     # 0: off; when on, the last step is evaluated too
    data: str = ""             # BEIR dir: corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    split: str = "dev"
    holdout: float = 0.0       # or: this fraction of each source's prepared rows, never trained on
    metric: str = "ndcg@10"    # the score that picks checkpoints (raylib.metrics name)
    head: str = "dense"        # whose score: dense, sparse, multivector (M3 heads)
    order: str = "max"
    modes: list[str] = field(default_factory=list)  # heads to evaluate; empty: dense + trained M3 heads
    max_queries: int = 0       # first N queries of the set (0: all)
    batch_size: int = 64
    load_best: bool = True     # the job's checkpoint is the best one (False: the last)

    def __post_init__(self) -> None:
        from raylib.metrics import _parse

        _parse(self.metric)
        if self.every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps must be >= 0, got {self.every_n_steps}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"eval.holdout must be in [0, 1), got {self.holdout}")
        if self.every_n_steps and bool(self.data) == bool(self.holdout):
            raise ValueError("eval needs exactly one of eval.data (a BEIR dir) and eval.holdout (a fraction)")
        if self.order not in ("max", "min"):
            raise ValueError(f"eval.order must be max or min, got {self.order!r}")
        if self.head not in ("dense", "sparse", "multivector", "hybrid"):
            raise ValueError(f"eval.head must be dense, sparse, multivector or hybrid, got {self.head!r}")

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    @property
    def score_attribute(self) -> str:
        """The reported metric that ranks checkpoints."""
        return f"eval/{self.head}/{self.metric}"


@dataclass
class ScalingSection:
    """Ray Train workers; fractional CPUs keep 2-core machines from starving Ray Data tasks."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 0
    ray_address: str = ""       # empty: connect to a running cluster or start a local one
    ray_num_cpus: int = 8       # CPU tokens of a local Ray started here


@dataclass
class TrainJobConfig:
    """The sections every training job has; jobs add their objective's section."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
