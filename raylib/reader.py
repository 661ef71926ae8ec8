"""Pair tables as text, pure pyarrow (no Ray): the streaming per-file readers of Parquet and JSONL,
and the row checks that decide a row's reject reason.

Every user column leaves the readers as UTF-8 text (JSON for nested values), and what was wrong
with a value or a line is marked in the internal columns `_bad_fields`/`_raw`; `row_reasons` turns
those marks (and null, empty, invisible, control-character, over-long or non-string values) into a
reason per row, and `split_batch` splits a batch into good rows and rejects with a `reason`. Only a
file that cannot be read at all fails (ValueError naming the file). Ray Data reads through these in
raylib.ray_data.io.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylib.storage import filesystem_for

BAD_FIELDS = "_bad_fields"  # per row: "kind:column,..." found by the reader (null when clean)
RAW = "_raw"  # per row: the raw line when it could not be parsed (null otherwise)
INTERNAL = (BAD_FIELDS, RAW)
# Rows per call of the row-level (Python) stages. Ray's default hands a UDF a whole block, and
# its Parquet reader coalesces small files into blocks of up to 128 MiB (450k short pairs): as
# Python lists that is >1 GB per worker, growing with the number of files. A fixed batch keeps a
# worker's memory independent of the input.
ROWS_PER_BATCH = 10_000
LINE_MARKS = ("invalid_json", "not_object", "line_too_long")  # marks that reject the whole line
# A JSONL line longer than this is rejected unread (`line_too_long`), so a file without newlines
# cannot grow a read task's memory without bound. Far above any row `max_chars` would keep.
MAX_LINE_BYTES = 64 << 20


# ----------------------------------------------------------------------------- reading
# Every user column leaves the readers as UTF-8 text (pa.string), whatever its type in the file:
# blocks of different files then always concatenate (Ray merges the blocks it batches, and a
# column that is int in one file and string in another fails that merge for the whole job), and
# how one file is read never depends on another. Values that were not text arrive as text (JSON
# for nested values) with a `not_string:<col>` mark, which rejects the row if the column is
# required and is ignored otherwise (a carried `id` of int64 becomes "12").
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view,
                 pa.types.is_fixed_size_binary)
_TEXT_AS_BINARY = {pa.types.is_string: pa.binary(), pa.types.is_large_string: pa.large_binary(),
                   pa.types.is_string_view: pa.binary_view()}


def _clean_str(value: str) -> tuple[str, str | None]:
    """(valid UTF-8 text, problem): surrogates that cannot be encoded become visible escapes;
    the problem is `undecodable` (bytes kept by surrogateescape) or `lone_surrogate` (\\ud800)."""
    try:
        value.encode("utf-8")
        return value, None
    except UnicodeEncodeError:
        pass
    out, problem = [], "undecodable"
    for ch in value:
        c = ord(ch)
        if 0xDC80 <= c <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append(f"\\x{c - 0xDC00:02x}")
        elif 0xD800 <= c <= 0xDFFF:
            out.append(f"\\u{c:04x}")
            problem = "lone_surrogate"
        else:
            out.append(ch)
    return "".join(out), problem


def _decode_rows(values: list) -> tuple[list[str | None], list[str | None]]:
    """Bytes per row -> (text, `undecodable` or None); invalid bytes shown as \\xNN."""
    texts, problems = [], []
    for b in values:
        if b is None:
            texts.append(None)
            problems.append(None)
            continue
        try:
            texts.append(b.decode("utf-8"))
            problems.append(None)
        except UnicodeDecodeError:
            texts.append(b.decode("utf-8", "backslashreplace"))
            problems.append("undecodable")
    return texts, problems


def _json_text(value: Any) -> str:
    """A non-string value as JSON text (UTF-8 clean)."""
    return _clean_str(json.dumps(value, ensure_ascii=False, default=str))[0]


def _text_array(arr: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, list[str | None] | None]:
    """Any Arrow column as (UTF-8 string array, per-row problem or None; None when no row has one).

    All string types (string, large_string, string_view, dictionary of them) and binary columns
    holding valid UTF-8 are text; invalid UTF-8 is `undecodable`; any other type is rendered
    (numbers by Arrow's cast, nested values as JSON) with `not_string` on its non-null rows."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t, n = arr.type, len(arr)
    if pa.types.is_null(t):
        return pa.nulls(n, pa.string()), None
    for is_text, binary in _TEXT_AS_BINARY.items():
        if is_text(t):  # the same bytes, checked for UTF-8 below (Parquet may hold invalid text)
            arr, t = arr.view(binary), binary
            break
    if any(is_bin(t) for is_bin in _BINARY_TYPES):
        try:
            return _to_string(arr), None  # validates UTF-8
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            texts, problems = _decode_rows(arr.to_pylist())
            return pa.array(texts, pa.string()), problems
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    problems = [("not_string" if v else None) for v in valid.tolist()]
    try:
        return _to_string(arr), problems
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        texts = [None if v is None else _json_text(v) for v in arr.to_pylist()]
        return pa.array(texts, pa.string()), problems


def _to_string(arr: pa.Array) -> pa.Array:
    """Arrow cast to string (large_string if the offsets of one string array would overflow)."""
    try:
        return pc.cast(arr, pa.string())
    except pa.ArrowCapacityError:
        return pc.cast(arr, pa.large_string())


def _mark_name(name: str) -> str:
    """A column name as it appears in a mark (marks are comma-separated)."""
    return name.replace(",", "%2C")


class _CutLine(bytes):
    """The first bytes of a JSONL line longer than MAX_LINE_BYTES (rejected, not parsed)."""


def _join_marks(n: int, columns: dict[str, list[str | None] | None],
                existing: list[str | None] | None = None) -> pa.Array:
    """Per row "kind:col,..." from per-column problems (null where a row has none)."""
    marks: list[list[str]] = [[] if existing is None or not existing[i] else [existing[i]]
                              for i in range(n)]
    for name, problems in columns.items():
        if problems is None:
            continue
        for i, p in enumerate(problems):
            if p is not None:
                marks[i].append(f"{p}:{_mark_name(name)}")
    return pa.array([",".join(m) if m else None for m in marks], type=pa.string())


def text_table(table: pa.Table) -> pa.Table:
    """A file's block with every user column as text and its problems in `_bad_fields` (pure).

    Internal columns already present (from the JSONL parser) are kept and extended."""
    n = table.num_rows
    columns, problems = {}, {}
    for i, name in enumerate(table.column_names):
        if name in INTERNAL or name in columns:  # a repeated column name keeps its first column
            continue
        columns[name], problems[name] = _text_array(table.column(i))
    existing = table.column(BAD_FIELDS).to_pylist() if BAD_FIELDS in table.column_names else None
    columns[BAD_FIELDS] = _join_marks(n, problems, existing)
    columns[RAW] = (_text_array(table.column(RAW))[0] if RAW in table.column_names
                    else pa.nulls(n, pa.string()))
    return pa.table(columns)


def parse_jsonl_lines(lines: Sequence[bytes]) -> pa.Table:
    """Parse JSONL lines into an all-text table without ever raising on a bad line (pure, no Ray).

    Lines that are not UTF-8 JSON objects keep their text in `_raw` and a mark in `_bad_fields`
    (`invalid_json`, `not_object`); string fields with undecodable bytes or lone surrogate
    escapes are cleaned and marked `undecodable:<col>` / `lone_surrogate:<col>`; non-string
    values become JSON text marked `not_string:<col>`.
    """
    rows: list[dict] = []
    bad: list[list[str]] = []
    raws: list[str | None] = []
    for line in lines:
        marks: list[str] = []
        text = line.decode("utf-8", "surrogateescape")
        try:
            obj = None if isinstance(line, _CutLine) else json.loads(text)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            marks.append("line_too_long" if isinstance(line, _CutLine)
                         else "invalid_json" if obj is None else "not_object")
            rows.append({})
            raws.append(_clean_str(text)[0])
            bad.append(marks)
            continue
        row = {}
        for key, value in obj.items():
            key = _clean_str(str(key))[0]
            if key in INTERNAL:
                continue
            if value is not None and not isinstance(value, str):
                value = _json_text(value)
                marks.append(f"not_string:{_mark_name(key)}")
            elif value is not None:
                value, problem = _clean_str(value)
                if problem:
                    marks.append(f"{problem}:{_mark_name(key)}")
            row[key] = value
        rows.append(row)
        raws.append(None)
        bad.append(marks)
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: pa.array([r.get(name) for r in rows], type=pa.string()) for name in names}
    columns[BAD_FIELDS] = pa.array([",".join(m) if m else None for m in bad], type=pa.string())
    columns[RAW] = pa.array(raws, type=pa.string())
    return pa.table(columns)


def unreadable(path: str, error: Exception) -> ValueError:
    """The error for a file that cannot be read at all (its text keeps the cause, so Ray still
    retries transient storage errors by message)."""
    return ValueError(f"cannot read input file {path}: {type(error).__name__}: {error}")


def iter_jsonl_file(f: Any, path: str, rows_per_block: int = 20_000) -> Iterator[pa.Table]:
    """Blocks of `rows_per_block` parsed lines of one JSONL stream (pure, no Ray; see
    `parse_jsonl_lines`). A UTF-8 byte-order mark at the start of the file is skipped."""
    pending: list[bytes] = []
    tail = b""
    first, skipping = True, False  # skipping: inside a line over MAX_LINE_BYTES, up to its end
    while True:
        try:
            chunk = f.read(8 << 20)
        except (OSError, pa.ArrowException) as e:
            raise unreadable(path, e) from e
        if not chunk:
            break
        if first:
            chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
        if skipping:
            end = chunk.find(b"\n")
            if end < 0:
                continue
            chunk, skipping = chunk[end + 1:], False
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        pending.extend(p for p in parts if p.strip())
        if len(tail) > MAX_LINE_BYTES:
            pending.append(_CutLine(tail[:1024]))
            tail, skipping = b"", True
        while len(pending) >= rows_per_block:
            yield parse_jsonl_lines(pending[:rows_per_block])
            pending = pending[rows_per_block:]
    if tail.strip():
        pending.append(tail)
    if pending:
        yield parse_jsonl_lines(pending)


def iter_parquet_file(f: Any, path: str, rows_per_block: int = 20_000) -> Iterator[pa.Table]:
    """Blocks of at most `rows_per_block` rows of one Parquet file, read batch by batch with the
    file's own schema and turned into text by `text_table` (pure, no Ray)."""
    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, use_threads=False):
            yield text_table(pa.Table.from_batches([batch]))
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e) from e


# ----------------------------------------------------------------------------- rejects
# Text that is there but cannot be seen or holds control characters is rejected, not filtered:
# it is malformed input (a query of zero-width spaces, a document with NUL bytes), and its
# embedding would be noise. RE2 patterns, run by Arrow over a whole column.
CONTROL_CHARS = r"[\x{0}-\x{8}\x{b}\x{c}\x{e}-\x{1f}\x{7f}-\x{9f}]"  # Cc except \t \n \r
# A visible character: not a separator (\p{Z}), control (Cc) or format character (Cf: zero-width
# spaces and joiners, BOM, soft hyphen, tags) and not one of the blank letters/marks below
# (Hangul fillers, braille blank, combining grapheme joiner, variation selectors).
VISIBLE_CHAR = (r"[^\s\p{Z}\p{Cc}\p{Cf}\x{115f}\x{1160}\x{3164}\x{ffa0}\x{2800}\x{34f}"
                r"\x{180b}-\x{180f}\x{fe00}-\x{fe0f}\x{e0100}-\x{e01ef}]")


def as_text(arr: pa.ChunkedArray | pa.Array) -> tuple[list[str | None], list[str | None]]:
    """Any column as (python strings or None, per-row problem kind or None); see `_text_array`."""
    text, problems = _text_array(arr)
    return text.to_pylist(), problems if problems is not None else [None] * len(text)


def _text_flags(text: pa.Array) -> tuple[list[bool], list[bool]]:
    """(has a control character, has a visible character) per row of a string array."""
    control = pc.match_substring_regex(text, CONTROL_CHARS).fill_null(False)
    visible = pc.match_substring_regex(text, VISIBLE_CHAR).fill_null(True)
    return control.to_pylist(), visible.to_pylist()


def row_reasons(table: pa.Table, required: Sequence[str], max_chars: int | None) -> list[str | None]:
    """Per row the first reason it is bad (or None), checking reader marks, then each required
    column in order: null (or missing), not_string, undecodable, lone_surrogate, empty,
    control_chars, no_visible_text, too_long."""
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    marks = table.column(BAD_FIELDS).to_pylist() if BAD_FIELDS in table.column_names else [None] * n
    req = list(required)
    for i, m in enumerate(marks):
        if not m:
            continue
        for mark in m.split(","):
            kind, _, col = mark.partition(":")
            if kind in LINE_MARKS or col in req:  # a whole line, or a required column's value
                reasons[i] = mark
                break
    for col in req:
        if col not in table.column_names:  # as null: the reason must not depend on which
            for i in range(n):               # files Ray happens to batch together
                if reasons[i] is None and not (marks[i] or "").startswith(LINE_MARKS):
                    reasons[i] = f"null:{col}"
            continue
        text, problems = _text_array(table.column(col))
        values = text.to_pylist()
        problems = problems if problems is not None else [None] * n
        control, visible = _text_flags(text)
        for i, v in enumerate(values):
            if reasons[i] is not None:
                continue
            if v is None:
                reasons[i] = f"null:{col}"
            elif problems[i] is not None:
                reasons[i] = f"{problems[i]}:{col}"
            elif not v.strip():
                reasons[i] = f"empty:{col}"
            elif control[i]:
                reasons[i] = f"control_chars:{col}"
            elif not visible[i]:
                reasons[i] = f"no_visible_text:{col}"
            elif max_chars is not None and len(v) > max_chars:
                reasons[i] = f"too_long:{col}"
    return reasons


def split_batch(table: pa.Table, required: Sequence[str], max_chars: int | None,
                 want: str) -> pa.Table:
    reasons = row_reasons(table, required, max_chars)
    if want == "good":
        keep = pa.array([r is None for r in reasons])
        out = table.filter(keep)
        for col in required:
            if col in out.column_names:
                out = out.set_column(out.column_names.index(col), col, _text_array(out.column(col))[0])
        return out.drop_columns([c for c in INTERNAL if c in out.column_names])
    keep = [i for i, r in enumerate(reasons) if r is not None]
    out = table.take(pa.array(keep, type=pa.int64()))
    columns = {}
    for name in out.column_names:
        if name in INTERNAL:
            continue
        columns[name] = pa.array(as_text(out.column(name))[0], type=pa.string())
    for col in required:  # uniform schema for the rejects dataset
        columns.setdefault(col, pa.nulls(len(keep), pa.string()))
    columns["raw"] = (out.column(RAW).combine_chunks() if RAW in out.column_names
                      else pa.nulls(len(keep), pa.string()))
    columns["reason"] = pa.array([reasons[i] for i in keep], type=pa.string())
    return pa.table(columns)


# ----------------------------------------------------------------------------- Parquet dirs


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


