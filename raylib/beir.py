"""BEIR-format data sets: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BeirData:
    corpus: dict[str, dict[str, str]]   # doc id -> {"title", "text"}
    queries: dict[str, str]             # query id -> text (only queries that have qrels)
    qrels: dict[str, dict[str, int]]    # query id -> {doc id: grade}

    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        """title + " " + text, as MTEB and BEIR evaluate (title dropped when empty)."""
        return [document_text(d) for d in self.corpus.values()]

    def empty_counts(self) -> dict[str, int]:
        """{"empty_queries", "empty_documents"}: texts that are empty or whitespace only (some
        public sets hold them; evaluation encodes them like any other text, as MTEB does)."""
        return {"empty_queries": sum(not q.strip() for q in self.queries.values()),
                "empty_documents": sum(not t for t in self.doc_texts())}


def document_text(doc: dict[str, str]) -> str:
    title = (doc.get("title") or "").strip()
    return f"{title} {doc.get('text') or ''}".strip() if title else (doc.get("text") or "").strip()


def _read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one a line (a UTF-8 byte-order mark at the start is skipped)."""
    with open(path, encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def _text(value: object) -> str:
    """A text field as a string: missing or null is "" (an empty text, still evaluated)."""
    return "" if value is None else value if isinstance(value, str) else str(value)


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TSV with header query-id, corpus-id, score."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if [h.strip() for h in header[:2]] != ["query-id", "corpus-id"]:
            raise ValueError(f"{path}: expected header query-id, corpus-id, score; got {header}")
        for row in reader:
            if row:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def load_beir(root: str | Path, split: str = "test") -> BeirData:
    """Load a BEIR dir; queries are restricted to those with qrels in `split`. Empty or missing
    texts are kept as "" (see `BeirData.empty_counts`)."""
    root = Path(root)
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise ValueError(f"{root}: no qrels for split {split!r} ({qrels_path} missing)")
    qrels = load_qrels(qrels_path)
    corpus = {str(d["_id"]): {"title": _text(d.get("title")), "text": _text(d.get("text"))}
              for d in _read_jsonl(root / "corpus.jsonl")}
    queries = {str(q["_id"]): _text(q.get("text")) for q in _read_jsonl(root / "queries.jsonl")
               if str(q["_id"]) in qrels}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)


def load_beir_uri(location: str, split: str = "test") -> BeirData:
    """`load_beir` of a local dir, or of s3:// through a temporary local copy (the reader may run
    on any node: nothing is read from a disk another node wrote)."""
    from raylib.storage import is_s3

    if not is_s3(location):
        return load_beir(location, split)
    import tempfile

    from raylib.storage import copy_tree

    with tempfile.TemporaryDirectory() as tmp:
        copy_tree(location, tmp)
        return load_beir(tmp, split)
