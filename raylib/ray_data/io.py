"""Ray Data input/output for pair tables: Parquet or JSONL, local or s3://, bad rows quarantined.

`read_table` never fails on a bad row or on files whose schemas disagree: both formats are read
by the core's streaming readers (raylib.reader), one file at a time in read tasks (Ray's JSON
reader aborts the whole read on one undecodable line; its Parquet reader and batching fail the job
when a column's type differs between files). Every user column leaves the reader as UTF-8 text,
and what was wrong with a value or line is marked in the internal columns `_bad_fields`/`_raw`.
`split_rejects` then turns those marks (and null, empty, invisible, control-character,
over-long or non-string values) into a `reason` column on a rejects dataset, so every input row
is either good or rejected, never lost. Only a file that cannot be read at all fails the read
(ValueError naming the file).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import pyarrow as pa
import ray
from ray.data import Dataset
from ray.data._internal.savemode import SaveMode
from ray.data.datasource import FileBasedDatasource

from raylib.reader import ROWS_PER_BATCH, iter_jsonl_file, iter_parquet_file, split_batch, unreadable
from raylib.storage import filesystem_for, list_data_files


class JsonlDatasource(FileBasedDatasource):
    """JSON-lines files, each read as a stream of blocks by `iter_jsonl_file`."""

    _FILE_EXTENSIONS = ["jsonl", "json", "ndjson", "gz"]

    def __init__(self, paths, rows_per_block: int = 20_000, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from iter_jsonl_file(f, path, self.rows_per_block)



class ParquetTextDatasource(FileBasedDatasource):
    """Parquet files, each read on its own, batch by batch, by `iter_parquet_file`."""

    _FILE_EXTENSIONS = ["parquet", "pq"]

    def __init__(self, paths, rows_per_block: int = 20_000, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        try:
            return filesystem.open_input_file(path)  # Parquet needs random access
        except (OSError, pa.ArrowException) as e:
            raise unreadable(path, e) from e

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from iter_parquet_file(f, path, self.rows_per_block)



def read_table(path: str | Sequence[str], rows_per_block: int = 20_000,
               override_num_blocks: int | None = None) -> Dataset:
    """Read Parquet and/or JSONL (a file, a list of files, or a dir; local or s3://) lazily.

    Each file is read on its own, streaming, in a read task (no file is read on the driver),
    and every user column arrives as text (see `text_table`): files whose schemas disagree never
    fail the read. Tables carry the internal columns `_bad_fields` and `_raw`; pass the dataset
    through `split_rejects` to turn them into rejects with reasons. `override_num_blocks` caps
    the read parallelism (small inputs on small machines: fewer tasks and worker processes).
    A file that cannot be read at all fails the read with a ValueError naming it.
    """
    fs, parquet, jsonl = list_data_files(path)
    parts = []
    if parquet:
        parts.append(ray.data.read_datasource(
            ParquetTextDatasource(parquet, filesystem=fs, rows_per_block=rows_per_block),
            override_num_blocks=override_num_blocks))
    if jsonl:
        parts.append(ray.data.read_datasource(
            JsonlDatasource(jsonl, filesystem=fs, rows_per_block=rows_per_block),
            override_num_blocks=override_num_blocks))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])



def split_rejects(ds: Dataset, required: Sequence[str], max_chars: int | None,
                  num_cpus: float | None = None) -> tuple[Dataset, Dataset]:
    """(good rows, rejected rows with a string `reason` column); never fails on bad rows.

    Good rows have every required column as a non-empty string of at most `max_chars`.
    Rejected rows keep their values as text (non-strings as JSON), plus `raw` for unparseable
    lines. Both are lazy: consuming both reads the input twice (no materialization).
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    required = list(required)
    kw = dict(batch_format="pyarrow", num_cpus=num_cpus, zero_copy_batch=True,
              batch_size=ROWS_PER_BATCH)
    good = ds.map_batches(split_batch, fn_args=(required, max_chars, "good"), **kw)
    bad = ds.map_batches(split_batch, fn_args=(required, max_chars, "bad"), **kw)
    return good, bad



def write_parquet(ds: Dataset, path: str, overwrite: bool = True, **kwargs: Any) -> None:
    """Write `ds` as Parquet files under `path` (local or s3://; S3 with delayed open)."""
    fs, inner = filesystem_for(path)
    mode = SaveMode.OVERWRITE if overwrite else SaveMode.APPEND
    ds.write_parquet(inner, filesystem=fs, mode=mode, **kwargs)
