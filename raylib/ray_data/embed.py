"""Embedding stage for Ray Data: an actor pool of callable classes, each holding one raylib Encoder.

Two ways to turn text into token ids (the model half is the same `Encoder.encode_features`):
  - in the actor (`tokenize_upstream=False`, the default on CPU): each actor tokenizes its own
    rows, then runs the model. On CPU the tokenizer is a small share of an actor's time (0.2%
    with minilm or me5-small, 8.5% with the hidden-32 test model; bench/tokenize_vs_model.py,
    bench/filter_scale.py) and both modes ran within noise of each other on 2 cores, so the
    actor keeps it and no ids travel between processes;
  - upstream (`tokenize_upstream=True`, the default with GPUs): stateless CPU `map_batches`
    tasks tokenize (the model's tokenizer only, loaded once per worker process) and add a
    list<int32> column of unpadded ids per encoded column; the actor sorts them by length into
    padded batches and only runs the model, so a GPU never waits on a single-threaded tokenizer.
Actors take fractional CPUs by default so they never starve the read/write tasks on small
machines (Ray Data map workers reserve 1 CPU each by default: on 2 cores the read tasks never schedule); `num_gpus > 0` gives GPU actors. With `stats` (a CurationStats actor)
each actor reports its rows and seconds, split into tokenize_s and model_s, and each upstream
tokenizer worker its own rows and seconds.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data import Dataset

if TYPE_CHECKING:  # raylib.model imports torch: tasks that only route rows skip it (1.5-2 s each)
    from raylib.model import EncoderSettings, ModelSpec, TextTokenizer

TOKENS_PREFIX = "_tokens:"  # + output column: the upstream token ids of that output's text


def tokens_column(output_column: str) -> str:
    """Name of the column of token ids made upstream for `output_column`."""
    return TOKENS_PREFIX + output_column


def resolve_tokenize_upstream(tokenize_upstream: bool | None, num_gpus: float) -> bool:
    """None (auto): upstream for GPU actors, in the actor on CPU (the faster one measured there)."""
    return bool(num_gpus and num_gpus > 0) if tokenize_upstream is None else bool(tokenize_upstream)


def capped_max_length(max_length: int | None, settings: EncoderSettings) -> int | None:
    """The requested max length, never past the model's own (its position table)."""
    limit = settings.max_length
    if limit and (max_length is None or max_length > limit):
        return limit
    return max_length


def _jobs(column: str, kind: str, output_column: str, max_length: int | None,
          also: Sequence[tuple]) -> list[tuple[str, str, str, int | None]]:
    """(column, kind, output_column, max_length) per encoded column, checked."""
    jobs = [(column, kind, output_column, max_length)]
    jobs += [(*j[:3], j[3] if len(j) > 3 else max_length) for j in also]
    for _, k, _, _ in jobs:
        if k not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {k!r}")
    return jobs


_TOKENIZERS: dict["ModelSpec", tuple["TextTokenizer", str, list]] = {}  # per worker process


def _worker_tokenizer(model: ModelSpec) -> tuple[TextTokenizer, str, list]:
    """This process's tokenizer for `model` (loaded once), its stats key and [rows, seconds]."""
    from raylib.model import TextTokenizer

    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = (TextTokenizer.from_pretrained(model),
                              f"tokenize:{os.getpid()}:{uuid.uuid4().hex[:8]}", [0, 0.0])
    return _TOKENIZERS[model]


def tokenize_batch(table: pa.Table, model: ModelSpec, jobs: list[tuple], stats: Any = None) -> pa.Table:
    """CPU task upstream of the actors: add the unpadded token ids (list<int32>) of each job's
    column, prefixed and truncated exactly as `Encoder.tokenize` would in the actor."""
    tok, key, totals = _worker_tokenizer(model)
    start = time.perf_counter()
    for column, kind, output_column, max_length in jobs:
        texts = [str(t) for t in table.column(column).to_pylist()]
        ids = (tok(texts, kind, capped_max_length(max_length, tok.settings), padding=False)["input_ids"]
               if texts else [])
        table = table.append_column(tokens_column(output_column), pa.array(ids, type=pa.list_(pa.int32())))
    totals[0] += table.num_rows
    totals[1] += time.perf_counter() - start
    if stats is not None:  # cumulative per worker process: a resent record overwrites
        stats.record_tokenize.remote(key, totals[0], totals[1])
    return table


class EmbedActor:
    """Callable class for `map_batches`: adds `output_column` (float32 [n, d]) from `column`,
    tokenizing in the actor or taking the ids from the upstream column (`tokenized`)."""

    def __init__(self, model: str | ModelSpec, column: str, kind: str, output_column: str,
                 batch_size: int = 64, max_length: int | None = None, num_threads: int | None = None,
                 dim: int | None = None, stats: Any = None, also: Sequence[tuple] = (),
                 tokenized: bool = False):
        import torch

        from raylib.model import Encoder

        # more (column, kind, output_column[, max_length]) encoded by the same model per call
        self.jobs = _jobs(column, kind, output_column, max_length, also)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoder = Encoder.from_pretrained(model)
        self.batch_size, self.dim, self.tokenized = batch_size, dim, tokenized
        self.seconds = 0.0  # time spent encoding (for throughput figures)
        self.split = {"tokenize_s": 0.0, "model_s": 0.0}
        self.rows = 0
        self.stats = stats  # optional CurationStats: record_embed(key, rows, seconds, split)
        self.key = f"{output_column}:{uuid.uuid4().hex[:8]}"

    def _token_ids(self, batch: dict[str, np.ndarray], column: str, kind: str, output_column: str,
                   max_length: int | None) -> Sequence:
        """Unpadded id rows for one job: the upstream column if tokenized, else tokenize here."""
        if self.tokenized:
            return batch.pop(tokens_column(output_column))
        texts = [str(t) for t in batch[column]]
        if not texts:
            return []
        max_length = capped_max_length(max_length, self.encoder.settings)
        return self.encoder.tokenize(texts, kind, max_length, padding=False)["input_ids"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = 0
        for column, kind, output_column, max_length in self.jobs:
            start = time.perf_counter()
            ids = self._token_ids(batch, column, kind, output_column, max_length)
            middle = time.perf_counter()
            n = len(ids)
            if n:
                emb = self.encoder.encode_features(ids, batch_size=self.batch_size, dim=self.dim)["dense"]
            else:
                emb = np.zeros((0, self.dim or self.encoder.dim), dtype=np.float32)
            batch[output_column] = np.ascontiguousarray(emb, dtype=np.float32)
            end = time.perf_counter()
            self.split["tokenize_s"] += middle - start
            self.split["model_s"] += end - middle
            self.seconds += end - start
        self.rows += n
        if self.stats is not None:  # cumulative per actor: a resent record overwrites
            self.stats.record_embed.remote(self.key, self.rows, self.seconds, dict(self.split))
        return batch


def embed(ds: Dataset, model: str | ModelSpec, column: str, kind: str, output_column: str,
          concurrency: int = 1, num_gpus: float = 0, batch_size: int = 64, num_cpus: float = 0.5,
          max_length: int | None = None, rows_per_call: int | None = None,
          num_threads: int | None = None, dim: int | None = None, stats: Any = None,
          also: Sequence[tuple] = (), tokenize_upstream: bool | None = None,
          tokenize_num_cpus: float = 0.5) -> Dataset:
    """Add `output_column` with dense embeddings of `column` using an actor pool of `concurrency`
    EmbedActors (GPU actors when `num_gpus > 0`). Each actor call gets `rows_per_call` rows
    (default 8 x batch_size) and encodes them in length-sorted batches of `batch_size`.
    `also`: more (column, kind, output_column[, max_length]) for the same actors (one model).
    `tokenize_upstream`: token ids from CPU tasks (`tokenize_num_cpus` each) before the actors;
    None = upstream for GPU actors, in the actor on CPU."""
    from raylib.model import ModelSpec

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model))
    jobs = _jobs(column, kind, output_column, max_length, also)
    rows = int(rows_per_call or 8 * batch_size)
    upstream = resolve_tokenize_upstream(tokenize_upstream, num_gpus)
    if upstream:
        ds = ds.map_batches(tokenize_batch, fn_kwargs=dict(model=spec, jobs=jobs, stats=stats),
                            batch_size=rows, batch_format="pyarrow", num_cpus=tokenize_num_cpus)
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=dict(model=spec, column=column, kind=kind,
                                   output_column=output_column, batch_size=batch_size,
                                   max_length=max_length, num_threads=num_threads, dim=dim,
                                   stats=stats, also=list(also), tokenized=upstream),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=rows,
        batch_format="numpy",
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
    )
