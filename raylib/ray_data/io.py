"""Ray Data input/output for pair tables: Parquet or JSONL, local or s3://, bad rows quarantined.

`read_table` never fails on a bad row: JSONL is parsed by our own line reader (Ray's JSON reader
aborts the whole read on one undecodable line or on a column whose type changes), which keeps
every line and marks what was wrong with it in the internal columns `_bad_fields`/`_raw`.
`split_rejects` then turns those marks (and null, empty, over-long or non-string values) into a
`reason` column on a rejects dataset, so every input row is either good or rejected, never lost.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset
from ray.data._internal.savemode import SaveMode
from ray.data.datasource import FileBasedDatasource

from raylib.storage import filesystem_for, list_data_files

BAD_FIELDS = "_bad_fields"  # per row: "kind:column,..." found by the reader (null when clean)
RAW = "_raw"  # per row: the raw line when it could not be parsed (null otherwise)
INTERNAL = (BAD_FIELDS, RAW)
# Rows per call of the row-level (Python) stages. Ray's default hands a UDF a whole block, and
# its Parquet reader coalesces small files into blocks of up to 128 MiB (450k short pairs): as
# Python lists that is >1 GB per worker, growing with the number of files. A fixed batch keeps a
# worker's memory independent of the input.
ROWS_PER_BATCH = 10_000


# ----------------------------------------------------------------------------- reading
def _clean_str(value: str) -> tuple[str, bool]:
    """(valid UTF-8 text, was it undecodable): lone surrogates from surrogateescape -> \\xNN."""
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), True


def _column(values: list[Any], name: str, bad: list[list[str]]) -> pa.Array:
    """One block column: strings stay strings; a column mixing strings with other JSON values
    gets the others as JSON text and a `not_string:<name>` mark; all-null becomes string."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds or kinds == {str}:
        return pa.array(values, type=pa.string())
    if str not in kinds:
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    out = []
    for i, v in enumerate(values):
        if v is None or isinstance(v, str):
            out.append(v)
        else:
            out.append(json.dumps(v, ensure_ascii=False))
            bad[i].append(f"not_string:{name}")
    return pa.array(out, type=pa.string())


def parse_jsonl_lines(lines: Sequence[bytes]) -> pa.Table:
    """Parse JSONL lines into a table without ever raising on a bad line (pure, no Ray).

    Lines that are not UTF-8 JSON objects keep their text in `_raw` and a mark in `_bad_fields`
    (`invalid_json`, `not_object`); fields with undecodable bytes become `undecodable:<col>`.
    """
    rows: list[dict] = []
    bad: list[list[str]] = []
    raws: list[str | None] = []
    for line in lines:
        marks: list[str] = []
        text = line.decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            marks.append("invalid_json" if obj is None else "not_object")
            rows.append({})
            raws.append(_clean_str(text)[0])
            bad.append(marks)
            continue
        row = {}
        for key, value in obj.items():
            key = _clean_str(str(key))[0]
            if isinstance(value, str):
                value, undecodable = _clean_str(value)
                if undecodable:
                    marks.append(f"undecodable:{key}")
            row[key] = value
        rows.append(row)
        raws.append(None)
        bad.append(marks)
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    columns = {name: _column([r.get(name) for r in rows], name, bad) for name in names}
    columns[BAD_FIELDS] = pa.array([",".join(m) if m else None for m in bad], type=pa.string())
    columns[RAW] = pa.array(raws, type=pa.string())
    return pa.table(columns)


class JsonlDatasource(FileBasedDatasource):
    """JSON-lines files read in a stream of blocks of `rows_per_block` lines; never raises on a
    bad line (see `parse_jsonl_lines`)."""

    _FILE_EXTENSIONS = ["jsonl", "json", "ndjson", "gz"]

    def __init__(self, paths, rows_per_block: int = 20_000, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pending: list[bytes] = []
        tail = b""
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            pending.extend(p for p in parts if p.strip())
            while len(pending) >= self.rows_per_block:
                yield parse_jsonl_lines(pending[: self.rows_per_block])
                pending = pending[self.rows_per_block:]
        if tail.strip():
            pending.append(tail)
        if pending:
            yield parse_jsonl_lines(pending)


def read_table(path: str | Sequence[str], rows_per_block: int = 20_000,
               override_num_blocks: int | None = None) -> Dataset:
    """Read Parquet and/or JSONL (a file, a list of files, or a dir; local or s3://) lazily.

    JSONL tables carry the internal columns `_bad_fields` and `_raw`; pass the dataset through
    `split_rejects` to turn them into rejects with reasons. `override_num_blocks` caps the
    read parallelism (small inputs on small machines: fewer tasks and worker processes).
    """
    fs, parquet, jsonl = list_data_files(path)
    parts = []
    if parquet:
        parts.append(ray.data.read_parquet(parquet, filesystem=fs, file_extensions=None,
                                           override_num_blocks=override_num_blocks))
    if jsonl:
        parts.append(ray.data.read_datasource(
            JsonlDatasource(jsonl, filesystem=fs, rows_per_block=rows_per_block),
            override_num_blocks=override_num_blocks))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ----------------------------------------------------------------------------- rejects
def _as_text(arr: pa.ChunkedArray | pa.Array) -> tuple[list[str | None], list[str | None]]:
    """Any column as (python strings or None, per-row problem kind or None)."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            arr.validate(full=True)
            return arr.to_pylist(), [None] * len(arr)
        except pa.ArrowInvalid:
            arr = pc.cast(arr, pa.binary() if pa.types.is_string(t) else pa.large_binary())
            t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        values, problems = [], []
        for b in arr.to_pylist():
            if b is None:
                values.append(None)
                problems.append(None)
                continue
            try:
                values.append(b.decode("utf-8"))
                problems.append(None)
            except UnicodeDecodeError:
                values.append(b.decode("utf-8", "backslashreplace"))
                problems.append("undecodable")
        return values, problems
    if pa.types.is_null(t):
        return [None] * len(arr), [None] * len(arr)
    values = []
    for v in arr.to_pylist():
        values.append(None if v is None else json.dumps(v, ensure_ascii=False, default=str))
    return values, [None if v is None else "not_string" for v in values]


def row_reasons(table: pa.Table, required: Sequence[str], max_chars: int | None) -> list[str | None]:
    """Per row the first reason it is bad (or None), checking reader marks, then each required
    column in order: missing_column, null, not_string, undecodable, empty, too_long."""
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    marks = table.column(BAD_FIELDS).to_pylist() if BAD_FIELDS in table.column_names else [None] * n
    req = list(required)
    for i, m in enumerate(marks):
        if not m:
            continue
        for mark in m.split(","):
            kind, _, col = mark.partition(":")
            if not col or col in req:  # line-level marks, or a required column's value
                reasons[i] = mark
                break
    for col in req:
        if col not in table.column_names:
            for i in range(n):
                if reasons[i] is None and not (marks[i] or "").startswith(("invalid_json", "not_object")):
                    reasons[i] = f"missing_column:{col}"
            continue
        values, problems = _as_text(table.column(col))
        for i, (v, p) in enumerate(zip(values, problems)):
            if reasons[i] is not None:
                continue
            if v is None:
                reasons[i] = f"null:{col}"
            elif p is not None:
                reasons[i] = f"{p}:{col}"
            elif not v.strip():
                reasons[i] = f"empty:{col}"
            elif max_chars is not None and len(v) > max_chars:
                reasons[i] = f"too_long:{col}"
    for i, m in enumerate(marks):  # rows from unparseable lines always reject
        if reasons[i] is None and m and m.split(",")[0] in ("invalid_json", "not_object"):
            reasons[i] = m.split(",")[0]
    return reasons


def _split_batch(table: pa.Table, required: Sequence[str], max_chars: int | None,
                 want: str) -> pa.Table:
    reasons = row_reasons(table, required, max_chars)
    if want == "good":
        keep = pa.array([r is None for r in reasons])
        out = table.filter(keep)
        for col in required:
            if col in out.column_names:
                out = out.set_column(out.column_names.index(col), col,
                                     pa.array(_as_text(out.column(col))[0], type=pa.string()))
        return out.drop_columns([c for c in INTERNAL if c in out.column_names])
    keep = [i for i, r in enumerate(reasons) if r is not None]
    out = table.take(pa.array(keep, type=pa.int64()))
    columns = {}
    for name in out.column_names:
        if name in INTERNAL:
            continue
        columns[name] = pa.array(_as_text(out.column(name))[0], type=pa.string())
    for col in required:  # uniform schema for the rejects dataset
        columns.setdefault(col, pa.nulls(len(keep), pa.string()))
    columns["raw"] = (out.column(RAW).combine_chunks() if RAW in out.column_names
                      else pa.nulls(len(keep), pa.string()))
    columns["reason"] = pa.array([reasons[i] for i in keep], type=pa.string())
    return pa.table(columns)


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
    good = ds.map_batches(_split_batch, fn_args=(required, max_chars, "good"), **kw)
    bad = ds.map_batches(_split_batch, fn_args=(required, max_chars, "bad"), **kw)
    return good, bad


# ----------------------------------------------------------------------------- writing
def write_parquet(ds: Dataset, path: str, overwrite: bool = True, **kwargs: Any) -> None:
    """Write `ds` as Parquet files under `path` (local or s3://; S3 with delayed open)."""
    fs, inner = filesystem_for(path)
    mode = SaveMode.OVERWRITE if overwrite else SaveMode.APPEND
    ds.write_parquet(inner, filesystem=fs, mode=mode, **kwargs)


def count_rows(path: str) -> int:
    """Rows in a Parquet dir written by `write_parquet` (footers only; 0 if it does not exist)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return 0
    return pads.dataset(inner, filesystem=fs, format="parquet").count_rows()


def value_counts(path: str, column: str) -> dict[str, int]:
    """{value: rows} of one column of a Parquet dir, scanned batch by batch on the caller."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return {}
    counts: dict[str, int] = {}
    for batch in pads.dataset(inner, filesystem=fs, format="parquet").to_batches(columns=[column]):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + int(item["counts"])
    return counts


def to_numpy_strings(values: Any) -> np.ndarray:
    """A batch column as an object array of python strings."""
    return np.asarray(list(values), dtype=object)
