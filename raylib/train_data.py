"""Training batches from prepared, pre-tokenized shards (raylib.jobs.prepare), read by each Train
worker itself.

Arctic-Embed 2.0 App. C: every global batch comes from one source; for multilingual sources each
(source x language) subset is its own source (M3 §3.4: and each length bucket). The plan is a pure
function of (manifest, seed, epoch, step, rank):

- the prepare stage puts each source's rows in a seeded content-key order (independent of files
  and blocks); epoch e cuts that order, rotated by an offset drawn from rng(seed, epoch, source),
  into full global batches (the remainder of each source is dropped and counted);
- per epoch, all batches of all sources are shuffled with rng(seed, epoch): the next batch's source
  is thereby drawn in proportion to the source's (remaining) size, and every kept row is used once;
- global step = epoch * steps_per_epoch + position; rows rank*b .. (rank+1)*b-1 go to worker `rank`.

A batch is thus a contiguous run (at most two, where the rotation wraps) of its source's shards:
a worker reads only its own rows of a step (one or two row groups) straight from storage, a
background thread keeps `prefetch` steps ready, and memory is bounded by prefetch x batch, not by
the data set. The data position of a checkpoint is just the next step: a restarted run computes
the same plan and resumes at the exact next batch. `split_sources` + `iter_steps` are the same plan
over in-memory tables (tests and the plain-Python reference).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylib.prepare import row_keys, source_key
from raylib.storage import filesystem_for, join, read_text


def split_sources(table: pa.Table, seed: int = 0) -> dict[str, pa.Table]:
    """{source key: its rows in seeded content-key order}, in memory: the prepare stage's order
    (same keys, raylib.prepare.row_keys) for tests and references; needs `source`."""
    if "source" not in table.column_names:
        raise ValueError(f"training data needs a 'source' column (batches are drawn per source); "
                         f"got {table.column_names}")
    sources = table.column("source").to_pylist()
    languages = table.column("language").to_pylist() if "language" in table.column_names else [None] * len(sources)
    keys = np.array([source_key(s, lang) for s, lang in zip(sources, languages)], dtype=object)
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    hashes = row_keys(columns, table.num_rows, seed)
    out = {}
    for key in sorted(set(keys.tolist())):
        idx = np.flatnonzero(keys == key)
        idx = idx[np.argsort(hashes[idx], kind="stable")]
        out[key] = table.take(pa.array(idx))
    return out


@dataclass(frozen=True)
class BatchPlan:
    """Which rows of which source make step t's global batch; pure and cheap to recompute anywhere."""

    source_rows: tuple[tuple[str, int], ...]   # (source key, rows), sorted by key
    global_batch_size: int
    num_workers: int
    seed: int
    epochs: int
    max_steps: int = 0
    batch_sizes: tuple[tuple[str, int], ...] = ()  # (source key, its global batch size) overrides

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        for source, size in ((None, self.global_batch_size), *self.batch_sizes):
            if size < 1 or size % self.num_workers:
                raise ValueError(f"global batch size {size}{f' of {source}' if source else ''} must be a "
                                 f"positive multiple of num_workers {self.num_workers}")
        if self.steps_per_epoch == 0:
            raise ValueError(f"no source has a full global batch: rows {dict(self.source_rows)}, "
                             f"batch sizes {self.sizes}")

    @property
    def sizes(self) -> dict[str, int]:
        """{source: global batch size} for every source."""
        override = dict(self.batch_sizes)
        return {s: override.get(s, self.global_batch_size) for s, _ in self.source_rows}

    @property
    def source_batches(self) -> dict[str, int]:
        sizes = self.sizes
        return {s: n // sizes[s] for s, n in self.source_rows}

    @property
    def dropped_rows(self) -> int:
        sizes = self.sizes
        return sum(n % sizes[s] for s, n in self.source_rows)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.source_batches.values())

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def batch_order(self, epoch: int) -> list[tuple[str, int]]:
        """All (source, batch index) pairs of one epoch in a seeded random order."""
        return _batch_order(tuple(self.source_batches.items()), self.seed, epoch)

    def rows_of(self, step: int, rank: int | None = None) -> tuple[str, np.ndarray]:
        """(source, row positions in that source's prepared order) of a step, all or one worker's
        part: a contiguous run modulo the source's rows."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside 0..{self.total_steps - 1}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        source, batch = self.batch_order(epoch)[pos]
        keys = [s for s, _ in self.source_rows]
        size, n = self.sizes[source], dict(self.source_rows)[source]
        rows = (_offset(n, self.seed, epoch, keys.index(source)) + batch * size + np.arange(size)) % n
        if rank is not None:
            b = size // self.num_workers
            rows = rows[rank * b:(rank + 1) * b]
        return source, rows

    def summary(self) -> dict:
        return {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size, "num_workers": self.num_workers,
                "source_rows": dict(self.source_rows), "source_batches": self.source_batches,
                "batch_sizes": dict(self.batch_sizes), "dropped_rows": self.dropped_rows}


@lru_cache(maxsize=8)
def _batch_order(source_batches: tuple[tuple[str, int], ...], seed: int, epoch: int) -> list[tuple[str, int]]:
    items = [(s, b) for s, n in source_batches for b in range(n)]
    perm = np.random.default_rng([seed, epoch, 7]).permutation(len(items))
    return [items[i] for i in perm]


@lru_cache(maxsize=256)
def _offset(n: int, seed: int, epoch: int, source_index: int) -> int:
    """Where epoch `epoch` starts cutting a source of n rows (a seeded rotation of its order)."""
    return int(np.random.default_rng([seed, epoch, 1000 + source_index]).integers(n))


def resolve_batch_sizes(sources: list[str], patterns: dict[str, int]) -> dict[str, int]:
    """{source: size} for the sources that a pattern names: the source key itself or its ending
    (`#len<=512` names every length bucket of that bound); an exact key wins over an ending."""
    out = {}
    for source in sources:
        hits = [p for p in patterns if source == p] or [p for p in patterns if source.endswith(p)]
        if len(hits) > 1:
            raise ValueError(f"source {source!r} matches several batch size patterns: {hits}")
        if hits:
            out[source] = int(patterns[hits[0]])
    return out


def make_plan(tables: dict[str, pa.Table | int], global_batch: int, num_workers: int, seed: int, epochs: int,
              max_steps: int = 0, batch_sizes: dict[str, int] | None = None) -> BatchPlan:
    """The plan for {source: table or row count} (split_sources' tables or a manifest's counts);
    `batch_sizes` maps source keys or key endings to their own global batch size (M3 §3.4: larger
    batches for shorter texts)."""
    sources = sorted(tables)
    rows = {s: t if isinstance(t, (int, np.integer)) else t.num_rows for s, t in tables.items()}
    sizes = resolve_batch_sizes(sources, batch_sizes or {})
    return BatchPlan(tuple((s, int(rows[s])) for s in sources), global_batch, num_workers,
                     seed, epochs, max_steps, tuple(sorted(sizes.items())))


def iter_steps(plan: BatchPlan, tables: dict[str, pa.Table], start_step: int,
               rank: int) -> Iterator[tuple[int, dict[str, list]]]:
    """(step, rows {column: list}) of this worker from start_step to the end of the plan."""
    for step in range(start_step, plan.total_steps):
        source, idx = plan.rows_of(step, rank)
        part = tables[source].take(pa.array(idx))
        yield step, {c: part.column(c).to_pylist() for c in part.column_names}


def runs_of(rows: np.ndarray) -> list[tuple[int, int]]:
    """Row positions -> [(start, stop)] runs of consecutive positions, in order."""
    if len(rows) == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(p[0]), int(p[-1]) + 1) for p in np.split(rows, cut)]


class PreparedData:
    """A prepared data set (manifest + shards, local or s3://): reads any run of a source's rows by
    row groups, so a worker fetches only its own rows of a step. Opened files are kept (LRU).
    `filesystem`: the driver's (pickled to the workers: an S3 endpoint and keys travel with it)."""

    def __init__(self, manifest: dict, root: str, filesystem=None, open_files: int = 8):
        self.manifest, self.root = manifest, root
        self._fs, self._root = filesystem_for(root) if filesystem is None else (filesystem, filesystem_for(root)[1])
        self.row_group_rows = int(manifest["row_group_rows"])
        self.columns = list(manifest["columns"])
        self._files = {s: v["files"] for s, v in manifest["sources"].items()}
        self._starts = {s: np.cumsum([0] + [f["rows"] for f in files]) for s, files in self._files.items()}
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self._max_open = open_files

    @classmethod
    def open(cls, root: str) -> "PreparedData":
        """Read `<root>/manifest.json` (no rows)."""
        return cls(json.loads(read_text(join(root, "manifest.json"))), root)

    @property
    def source_rows(self) -> dict[str, int]:
        return {s: int(v["rows"]) for s, v in self.manifest["sources"].items()}

    def _file(self, path: str) -> pq.ParquetFile:
        if path not in self._open:
            self._open[path] = pq.ParquetFile(self._fs.open_input_file(join(self._root, path)))
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(path)
        return self._open[path]

    def read_run(self, source: str, start: int, stop: int) -> pa.Table:
        """Rows start..stop-1 of a source, reading only the row groups that hold them."""
        starts, files, r = self._starts[source], self._files[source], self.row_group_rows
        parts = []
        for k in range(int(np.searchsorted(starts, start, side="right")) - 1, len(files)):
            lo, hi = max(start, starts[k]) - starts[k], min(stop, starts[k + 1]) - starts[k]
            if hi <= lo:
                break
            groups = list(range(lo // r, (hi - 1) // r + 1))
            table = self._file(files[k]["path"]).read_row_groups(groups, columns=self.columns)
            parts.append(table.slice(lo - groups[0] * r, hi - lo))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def read(self, source: str, rows: np.ndarray) -> pa.Table:
        """The given row positions of a source, in that order (read run by run)."""
        parts = [self.read_run(source, a, b) for a, b in runs_of(np.asarray(rows))]
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _id_rows(arr: pa.Array) -> list:
    """A list<int32> (or list<list<int32>>) column -> per row a numpy array (or a list of them)."""
    offsets = arr.offsets.to_numpy()
    if pa.types.is_list(arr.type.value_type):
        inner = _id_rows(arr.values)
        return [inner[offsets[i]:offsets[i + 1]] for i in range(len(arr))]
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def table_rows(table: pa.Table, source: str) -> dict[str, list]:
    """A worker's rows {column: list} for the objective: token id columns as numpy arrays."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        out[name] = _id_rows(col) if name.endswith("_ids") else col.to_pylist()
    out["source"] = [source] * table.num_rows
    return out


def iter_prepared_steps(plan: BatchPlan, data: PreparedData, start_step: int, rank: int,
                        prefetch: int = 2) -> Iterator[tuple[int, dict[str, list], float]]:
    """(step, rows, seconds waited for them) of this worker from start_step on; a background
    thread reads up to `prefetch` steps ahead (bounded queue), so a step rarely waits for storage."""
    if prefetch < 1:
        raise ValueError(f"data.prefetch must be >= 1, got {prefetch}")
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for step in range(start_step, plan.total_steps):
                source, rows = plan.rows_of(step, rank)
                if not put((step, table_rows(data.read(source, rows), source))):
                    return
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            tick = time.perf_counter()
            item = ready.get()
            waited = time.perf_counter() - tick
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item[0], item[1], waited
    finally:
        stop.set()


def synthetic_pairs(n: int, sources: dict[str, float] | None = None, seed: int = 0,
                    first_id: int = 0) -> pa.Table:
    """A learnable toy pair set for tests, debug runs and benchmarks (words of raylib.tiny's vocab):
    the document repeats the query's 3 topic words among 6 random filler words. Columns: id, query,
    document, source, language; `sources` maps "source/language" to its share of rows; ids are
    p<first_id>... (parts of a large set get distinct ids)."""
    from raylib.tiny import _WORDS

    rng = np.random.default_rng(seed)
    sources = sources or {"web/en": 1.0}
    names = list(sources)
    shares = np.array([sources[s] for s in names], dtype=float)
    which = rng.choice(len(names), size=n, p=shares / shares.sum())
    rows = {"id": [], "query": [], "document": [], "source": [], "language": []}
    for i in range(n):
        topic = rng.choice(len(_WORDS), size=3, replace=False)
        filler = rng.choice(len(_WORDS), size=6)
        words = [_WORDS[j] for j in np.concatenate([topic, filler])]
        rng.shuffle(words)
        source, _, language = names[which[i]].partition("/")
        rows["id"].append(f"p{first_id + i}")
        rows["query"].append(" ".join(_WORDS[j] for j in topic))
        rows["document"].append(" ".join(words))
        rows["source"].append(source)
        rows["language"].append(language)
    return pa.table(rows)
