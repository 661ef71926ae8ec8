"""The demo's own data set: real text every Python install carries, the standard library's docs.

Two sources, as the papers mix title-style and question-style pairs:
  stdlib-summary: query = a function's one-line summary, document = its qualified name, signature
                  and the rest of its docstring (the summary line removed, so it is not trivial);
  stdlib-title:   query = the qualified name (titles-as-queries, like Wikipedia titles),
                  document = the whole docstring.
A held-out BEIR split (queries = summaries of held-out functions, corpus = every document) lets
the demo measure retrieval before and after training.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = ["argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
           "datetime", "difflib", "email.utils", "fnmatch", "fractions", "functools", "glob",
           "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "ipaddress", "itertools",
           "json", "logging", "math", "mimetypes", "operator", "os", "os.path", "pathlib",
           "pickle", "platform", "pprint", "queue", "random", "re", "shlex", "shutil", "socket",
           "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
           "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "unicodedata",
           "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib"]

# C functions start their docstring with a signature line such as "dup(integer) -> integer".
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$", re.S)


def _entries() -> list[dict]:
    """(qualified name, signature, summary, body) for public documented callables, deduplicated."""
    seen, out = set(), []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj):
                continue
            home = getattr(obj, "__module__", None) or module_name
            if home.lstrip("_").split(".")[0] != module_name.split(".")[0]:
                continue  # re-exported from another module (uuid.Enum): counted there
            doc = inspect.getdoc(obj) or ""
            paragraphs = [p for p in doc.strip().split("\n\n") if not _SIGNATURE.match(p.strip())]
            if len(paragraphs) < 2:
                continue
            summary, body = " ".join(paragraphs[0].split()), "\n\n".join(paragraphs[1:]).strip()
            if len(summary) < 15 or len(body) < 40 or summary in seen:
                continue
            seen.add(summary)
            try:
                signature = f"{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = name
            out.append({"name": f"{module_name}.{name}", "signature": signature,
                        "summary": summary, "body": body, "doc": doc})
    return out


def build_demo_data(out_dir: str | Path, eval_fraction: float = 0.2, seed: int = 0,
                    num_functions: int | None = None) -> dict:
    """Write pairs.parquet (training pairs) and beir/ (held-out eval set); returns counts.
    num_functions: keep that many functions of the shuffled set (a quicker set for tests)."""
    out_dir = Path(out_dir)
    entries = _entries()
    random.Random(seed).shuffle(entries)
    entries = entries[:num_functions]
    num_eval = int(len(entries) * eval_fraction)
    held_out, train = entries[:num_eval], entries[num_eval:]
    rows = []
    for e in train:
        doc = f"{e['name']}: {e['signature']}\n{e['body']}"
        rows.append({"query": e["summary"], "document": doc, "source": "stdlib-summary", "language": "en"})
        rows.append({"query": e["name"], "document": e["doc"], "source": "stdlib-title", "language": "en"})
    for i, row in enumerate(rows):
        row["id"] = f"p{i}"
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "pairs.parquet")
    beir = out_dir / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    doc_id = {e["name"]: "d" + hashlib.sha1(e["name"].encode()).hexdigest()[:10] for e in entries}
    with open(beir / "corpus.jsonl", "w") as f:
        for e in entries:
            f.write(json.dumps({"_id": doc_id[e["name"]], "title": e["name"],
                                "text": f"{e['signature']}\n{e['body']}"}) + "\n")
    with open(beir / "queries.jsonl", "w") as f, open(beir / "qrels" / "test.tsv", "w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for i, e in enumerate(held_out):
            f.write(json.dumps({"_id": f"q{i}", "text": e["summary"]}) + "\n")
            q.write(f"q{i}\t{doc_id[e['name']]}\t1\n")
    return {"pairs": len(rows), "eval_queries": len(held_out), "corpus": len(entries)}


if __name__ == "__main__":  # python -m raylib.demo_data runs/demo/data: the debug configs' input
    import sys

    print(json.dumps(build_demo_data(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/data")))
