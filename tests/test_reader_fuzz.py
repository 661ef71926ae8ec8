"""Fuzz test of the curation readers: generated Parquet and JSONL files mixing valid rows with
every class of bad input (per-file type drift, all Arrow string types, BOM, lone surrogates,
undecodable bytes, truncated lines, invisible text, control characters). Every row must come out
once, as a kept row or a reject with the expected reason, through the pure readers and through
Ray Data (read_table + split_rejects, and the filter job's counting pass)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylib.ray_data.io import read_table, split_rejects
from raylib.reader import iter_jsonl_file, iter_parquet_file, row_reasons

REQUIRED = ["query", "document", "source", "language"]
MAX_CHARS = 500
WORDS = ("alpha beta gamma delta river mountain cloud engine protein galaxy naïve café 東京 "
         "🚀 مرحبا Ελλάδα x²").split()


class Corpus:
    """Generated input files and what must come out of them."""

    def __init__(self, root: Path, seed: int):
        self.root, self.rng = root, np.random.default_rng(seed)
        self.valid: list[tuple] = []  # (query, document, source, language) of every valid row
        self.rejects: Counter = Counter()
        self.total = 0
        self.n = 0
        root.mkdir(parents=True)

    def text(self, kind: str) -> str:
        """A valid text: words, sometimes with a tab, newline or an emoji joined by ZWJ."""
        self.n += 1
        words = list(self.rng.choice(WORDS, size=int(self.rng.integers(2, 7))))
        extra = ["", "\twith a tab", "\nsecond line", " 👩\u200d💻 dev"][int(self.rng.integers(4))]
        return f"{kind} {self.n} " + " ".join(words) + extra

    def valid_row(self, source: str = "web", language: str = "en") -> dict:
        row = {"query": self.text("q"), "document": self.text("d"), "source": source,
               "language": language}
        self.valid.append((row["query"], row["document"], source, language))
        return row

    def count(self, reason: str | None, n: int = 1) -> None:
        self.total += n
        if reason:
            self.rejects[reason] += n

    def mixed(self, n_valid: int, bad: list[tuple[dict, str]]) -> list[dict]:
        """`n_valid` valid rows and the planted bad ones, shuffled (valid rows counted here)."""
        rows = [self.valid_row() for _ in range(n_valid)] + [row for row, _ in bad]
        self.count(None, n_valid)
        for _, reason in bad:
            self.count(reason)
        order = self.rng.permutation(len(rows))
        return [rows[i] for i in order]


BAD_TEXTS = [  # (query, document) -> reason; each is rejected in either column
    ("\u200b\u200b\u200b", "no_visible_text"), ("\u3164\ufeff\u2060", "no_visible_text"),
    ("a\x00b", "control_chars"), ("bell\x07 here", "control_chars"), ("\x1b[31mred", "control_chars"),
    ("", "empty"), ("  \u3000\n", "empty"),
]


def bad_value_rows(c: Corpus) -> list[tuple[dict, str]]:
    out = []
    for text, reason in BAD_TEXTS:
        col = "query" if c.rng.random() < 0.5 else "document"
        row = {"query": c.text("q"), "document": c.text("d"), "source": "web", "language": "en"}
        row[col] = text
        out.append((row, f"{reason}:{col}"))
    row = {"query": None, "document": c.text("d"), "source": "web", "language": "en"}
    out.append((row, "null:query"))
    row = {"query": c.text("q"), "document": "long " * 200, "source": "web", "language": "en"}
    out.append((row, "too_long:document"))
    return out


def write_parquet_files(c: Corpus) -> None:
    """Parquet files that disagree on types: each file's schema is read on its own."""
    def table(rows: list[dict], types: dict) -> pa.Table:
        cols = {k: [r.get(k) for r in rows] for k in ["query", "document", "source", "language", "id"]}
        cols["id"] = list(range(len(rows)))
        return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})

    rows = c.mixed(int(c.rng.integers(20, 40)), bad_value_rows(c))
    pq.write_table(table(rows, {"id": pa.int64()}), c.root / "p0-plain.parquet")

    # drift: query is int64 in this file only (all its rows reject), id is a string here
    n = int(c.rng.integers(5, 15))
    pq.write_table(pa.table({"query": pa.array(range(n), pa.int64()),
                             "document": [c.text("d") for _ in range(n)],
                             "source": ["web"] * n, "language": ["en"] * n,
                             "id": [f"s{i}" for i in range(n)]}), c.root / "p1-int-query.parquet")
    c.count("not_string:query", n)

    # every Arrow string type is text: dictionary (pandas categorical), string_view, large_string
    rows = c.mixed(int(c.rng.integers(20, 40)), bad_value_rows(c))
    t = table(rows, {"document": pa.string_view(), "source": pa.large_string(),
                     "language": pa.large_string(), "id": pa.float64()})
    t = t.set_column(0, "query", t.column("query").dictionary_encode())
    t = t.set_column(3, "language", t.column("language").cast(pa.string()).dictionary_encode())
    pq.write_table(t, c.root / "p2-string-types.parquet", row_group_size=7)

    # binary documents: valid UTF-8 is text, invalid bytes are undecodable; a list-typed id
    rows = c.mixed(int(c.rng.integers(10, 20)), [])
    docs = [r["document"].encode() for r in rows]
    bad = [b"caf\xe9 latin-1", b"\xed\xa0\x80 encoded surrogate", b"\xff\xfe\x00"]
    queries = [r["query"] for r in rows] + [c.text("q") for _ in bad]
    c.count("undecodable:document", len(bad))
    n = len(queries)
    pq.write_table(pa.table({"query": queries, "document": pa.array(docs + bad, pa.binary()),
                             "source": ["web"] * n, "language": ["en"] * n,
                             "id": pa.array([[i, i] for i in range(n)])}), c.root / "p3-binary.parquet")

    # a nested query column, a file without `language`, an empty file, an all-null column
    n = 4
    pq.write_table(pa.table({"query": pa.array([["a", "b"]] * n), "document": ["some doc"] * n,
                             "source": ["web"] * n, "language": ["en"] * n}), c.root / "p4-list.parquet")
    c.count("not_string:query", n)
    pq.write_table(pa.table({"query": ["q one", "q two"], "document": ["d one", "d two"],
                             "source": ["web"] * 2}), c.root / "p5-no-language.parquet")
    c.count("null:language", 2)
    pq.write_table(table([], {}), c.root / "p6-empty.parquet")
    rows = c.mixed(3, [])
    pq.write_table(pa.table({"query": [r["query"] for r in rows], "document": [r["document"] for r in rows],
                             "source": ["web"] * 3, "language": ["en"] * 3,
                             "extra": pa.nulls(3)}), c.root / "p7-null-column.parquet")


def write_jsonl_files(c: Corpus) -> None:
    """JSONL with a BOM, lone surrogate escapes, undecodable bytes, a truncated last line."""
    lines: list[bytes] = []
    for row in c.mixed(int(c.rng.integers(20, 40)), bad_value_rows(c)):
        row = dict(row, id=[1, "x", {"k": None}, 3.5, None][int(c.rng.integers(5))])  # id drifts
        lines.append(json.dumps(row, ensure_ascii=bool(c.rng.integers(2))).encode())
    planted = {
        b'{"query": "lone \\ud800 surrogate", "document": "a fine document", "source": "web", "language": "en"}':
            "lone_surrogate:query",
        b'{"query": "a fine query", "document": "low \\udc80 half", "source": "web", "language": "en"}':
            "undecodable:document",
        b'{"query": "raw bytes \xff\xfe", "document": "a fine document", "source": "web", "language": "en"}':
            "undecodable:query",
        b'{"query": "nul escape", "document": "x\\u0000y", "source": "web", "language": "en"}':
            "control_chars:document",
        b'{"query": 12, "document": "number query", "source": "web", "language": "en"}': "not_string:query",
        b'["an", "array"]': "not_object",
        b"\xef\xbb\xbf{\"query\": \"a BOM mid-file\", \"document\": \"d\", \"source\": \"web\", \"language\": \"en\"}":
            "invalid_json",
        b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "invalid_json",  # RecursionError
    }
    for line, reason in planted.items():
        lines.insert(int(c.rng.integers(len(lines) + 1)), line)
        c.count(reason)
    # a lone surrogate in a carried column or a key is cleaned, and the row is kept
    row = c.valid_row()
    lines.append(json.dumps({**row, "id": "\ud83d", "k\udfff": "v", "a,b": 1, "": [2]}).encode())
    c.count(None)
    first = c.valid_row()  # after the BOM: must be kept
    c.count(None)
    body = b"\xef\xbb\xbf" + json.dumps(first).encode() + b"\n" + b"\r\n".join(lines) + b"\n\n"
    body += b'{"query": "truncated", "docu'  # no newline at the end
    c.count("invalid_json")
    (c.root / "j0-bom.jsonl").write_bytes(body)

    rows = c.mixed(int(c.rng.integers(5, 15)), [])
    (c.root / "j1-plain.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def make_corpus(root: Path, seed: int) -> Corpus:
    c = Corpus(root, seed)
    write_parquet_files(c)
    write_jsonl_files(c)
    return c


def _good_and_reasons(tables: list[pa.Table]) -> tuple[list[tuple], Counter, int]:
    good, reasons, total = [], Counter(), 0
    for t in tables:
        total += t.num_rows
        rs = row_reasons(t, REQUIRED, MAX_CHARS)
        reasons.update(r for r in rs if r)
        rows = t.to_pylist()
        good += [tuple(rows[i][k] for k in REQUIRED) for i, r in enumerate(rs) if r is None]
    return good, reasons, total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readers_without_ray(tmp_path, seed):
    """Each file read on its own by the pure readers: counts add up, every valid row is kept."""
    c = make_corpus(tmp_path / "in", seed)
    fs = pafs.LocalFileSystem()
    tables = []
    for path in sorted(c.root.iterdir()):
        if path.suffix == ".parquet":
            with fs.open_input_file(str(path)) as f:
                tables += list(iter_parquet_file(f, str(path), rows_per_block=8))
        else:
            with fs.open_input_stream(str(path)) as f:
                tables += list(iter_jsonl_file(f, str(path), rows_per_block=8))
    schemas = {tuple((f.name, f.type) for f in t.schema) for t in tables}
    assert all(ty == pa.string() for s in schemas for _, ty in s)  # every block concatenates
    good, reasons, total = _good_and_reasons(tables)
    assert total == c.total
    assert Counter(good) == Counter(c.valid)
    assert reasons == c.rejects


def test_line_over_the_limit_is_rejected_unread(tmp_path, monkeypatch):
    import raylib.reader as io

    monkeypatch.setattr(io, "MAX_LINE_BYTES", 1 << 20)
    ok = json.dumps({"query": "q", "document": "d", "source": "s", "language": "l"}).encode()
    path = tmp_path / "long.jsonl"
    path.write_bytes(ok + b"\n" + b'{"query": "' + b"a" * (20 << 20) + b'"}\n' + ok + b"\n" + ok)
    with pafs.LocalFileSystem().open_input_stream(str(path)) as f:
        tables = list(iter_jsonl_file(f, str(path)))
    reasons = [r for t in tables for r in row_reasons(t, REQUIRED, None)]
    assert reasons == [None, "line_too_long", None, None]
    assert len(tables[0].column("_raw")[1].as_py()) == 1024


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        with pafs.LocalFileSystem().open_input_file(str(bad)) as f:
            list(iter_parquet_file(f, str(bad)))


def test_readers_through_ray(ray_session, tmp_path):
    """The same corpus through Ray Data: read_table + split_rejects, and the filter job's count."""
    from raylib.filters import HeuristicConfig
    from raylib.ray_data.consistency import status_counts

    c = make_corpus(tmp_path / "in", seed=3)
    good, bad = split_rejects(read_table(str(c.root), rows_per_block=16, override_num_blocks=2), REQUIRED, MAX_CHARS)
    kept = good.to_arrow_refs()
    kept_rows = [tuple(r[k] for k in REQUIRED) for ref in kept for r in ray_session.get(ref).to_pylist()]
    rejects = Counter()
    for ref in bad.to_arrow_refs():
        rejects.update(ray_session.get(ref).column("reason").to_pylist())
    assert Counter(kept_rows) == Counter(c.valid)
    assert rejects == c.rejects
    assert len(kept_rows) + sum(rejects.values()) == c.total

    counts = status_counts(read_table(str(c.root), override_num_blocks=2), REQUIRED, MAX_CHARS, HeuristicConfig())
    by_reason = Counter({k[0][len("reject:"):]: 0 for k in counts if k[0].startswith("reject:")})
    for (status, _, _), n in counts.items():
        if status.startswith("reject:"):
            by_reason[status[len("reject:"):]] += n
    assert sum(counts.values()) == c.total
    assert by_reason == c.rejects
    assert sum(n for (status, _, _), n in counts.items() if not status.startswith("reject:")) == len(c.valid)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ok.jsonl").write_text(json.dumps(c.valid_row()) + "\n")
    (broken / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(Exception, match="x.parquet"):
        read_table(str(broken)).count()
