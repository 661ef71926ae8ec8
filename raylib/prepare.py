"""The prepare stage's pieces, pure pyarrow (no Ray): pairs (or mined rows) -> per-source,
pre-tokenized Parquet shards in a seeded, layout-independent order, plus a manifest. Nothing here
runs per row on the driver, and the driver never holds rows: it plans, collects one metadata row
per written file and writes manifest.json.

Pipeline (raylib.jobs.prepare.run_pipeline runs it on Ray Data):
  read_table (per-file readers, every column as text)
  -> map_batches(prepare_batch): reject reasons (raylib.reader.row_reasons), batch source key
     (source x language, plus `#len<=B` for M3 §3.4 length buckets), a seeded content key
     (`row_keys`), its key-range partition, token ids of queries and documents (the model's
     tokenizer: prefixes, max lengths)
  -> groupby(source, part).map_groups(write_group): each group sorted by key and written as one
     Parquet file with row groups of `row_group_rows`; rejected rows are only counted.

A source's order is "all its rows sorted by the seeded key": partitions are key ranges, so the
files of a source, taken in partition order, are that order, whatever the input files, blocks or
partition count were. Row i of a source is a position the training plan can address directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylib.storage import join

KEY_COLUMNS = ("id", "query", "document", "positive")  # what a row's seeded content key hashes
IDS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([("source", pa.string()), ("part", pa.int32()), ("key", pa.int64()),
                         ("id", pa.string()), ("reason", pa.string()),
                         ("query_ids", IDS), ("document_ids", IDS)])
MINED_SCHEMA = pa.schema([("source", pa.string()), ("part", pa.int32()), ("key", pa.int64()),
                          ("id", pa.string()), ("reason", pa.string()),
                          ("query_ids", IDS), ("positive_ids", IDS), ("negatives_ids", pa.list_(IDS)),
                          ("positive_score", pa.float32()), ("negative_scores", pa.list_(pa.float32()))])
SHARD_DROP = ("source", "part", "reason")  # planning columns that stay out of the shards
REJECTED = ""  # the source key of rejected rows (never a real source key)


@dataclass(frozen=True)
class PrepareSpec:
    """What prepare_batch needs in every task (pickled to them): plain values only."""

    kind: str                      # "pairs" (query, document) or "mined" (query, positive, negatives)
    model: str                     # tokenizer source: a name/dir, or "tiny"
    tiny: tuple = ()               # tiny_encoder kwargs as sorted items (hashable)
    query_max_length: int = 32
    document_max_length: int = 256
    num_negatives: int = 0         # mined: negatives that count for a row's length bucket
    length_bounds: tuple = ()      # M3 §3.4 bucket upper bounds in tokens (empty: no buckets)
    seed: int = 0
    partitions: int = 1            # key ranges per source (file size only; not the order)
    row_group_rows: int = 1024
    row_groups_per_file: int = 512  # bounds a file's footer (a reader keeps a few files open)

    def __post_init__(self) -> None:
        if self.kind not in ("pairs", "mined"):
            raise ValueError(f"kind must be pairs or mined, got {self.kind!r}")
        if min(self.partitions, self.row_group_rows, self.row_groups_per_file) < 1:
            raise ValueError("partitions, row_group_rows and row_groups_per_file must be >= 1")
        if min(self.query_max_length, self.document_max_length) < 1:
            raise ValueError("max lengths must be >= 1")

    @property
    def required(self) -> tuple[str, ...]:
        return ("query", "document", "source") if self.kind == "pairs" else ("query", "positive", "source")

    @property
    def schema(self) -> pa.Schema:
        return PAIR_SCHEMA if self.kind == "pairs" else MINED_SCHEMA


# ----------------------------------------------------------------------------- pure pieces
def source_key(source, language) -> str:
    """The batch source name: `source` or `source/language`."""
    return f"{source}/{language}" if language not in (None, "") else str(source)


def row_keys(columns: dict[str, Sequence], n: int, seed: int) -> np.ndarray:
    """A seeded content key per row (blake2b of KEY_COLUMNS; absent or null = ""), in [0, 2^63):
    sorting by it gives a seeded order that no file or block layout can change."""
    values = [columns.get(c) or [None] * n for c in KEY_COLUMNS]
    salt = str(int(seed)).encode()
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        text = "\x1f".join("" if v[i] is None else str(v[i]) for v in values)
        out[i] = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                                                key=salt).digest(), "big") >> 1
    return out


def key_partition(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Key-range partition of each key (monotone in the key): partitions are ranges of the order."""
    return np.minimum((keys.astype(np.float64) / 2.0 ** 63 * partitions).astype(np.int64), partitions - 1)


def length_tags(sources: list[str], lengths: Sequence[int], bounds: Sequence[int]) -> list[str]:
    """`<source>#len<=<bound>` per row (M3 §3.4); unchanged sources when there are no bounds."""
    if not bounds:
        return list(sources)
    from raylib.batching import bucket_sources

    return bucket_sources(sources, lengths, bounds)


@lru_cache(maxsize=4)
def load_text_tokenizer(model: str, tiny: tuple = ()) -> Any:
    """The model's TextTokenizer (prefixes, max length), once per worker process; `tiny` builds
    raylib.tiny's tokenizer exactly as the training job's tiny Encoder has it."""
    if model == "tiny":
        from raylib.tiny import tiny_text_tokenizer

        return tiny_text_tokenizer(**dict(tiny))
    from raylib.model import TextTokenizer

    return TextTokenizer.from_pretrained(model)


def tokenizer_identity(text_tokenizer: Any) -> dict:
    """What makes token ids reproducible: vocabulary + pipeline hash, prefixes, pad id, side."""
    tok = text_tokenizer.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # without the call-time truncation/padding state each call resets
        state = json.loads(backend.to_str())
        body = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        body = json.dumps(tok.get_vocab(), sort_keys=True)
    return {"class": type(tok).__name__, "sha256": hashlib.sha256(body.encode()).hexdigest(),
            "query_prefix": text_tokenizer.settings.query_prefix,
            "document_prefix": text_tokenizer.settings.document_prefix,
            "pad_token_id": int(tok.pad_token_id), "padding_side": tok.padding_side}


def _json_list(value: str | None) -> list | None:
    """A list column that the text readers turned into JSON text (None if it is not a list)."""
    if value is None:
        return []
    try:
        out = json.loads(value)
    except ValueError:
        return None
    return out if isinstance(out, list) else None


def prepare_batch(table: pa.Table, spec: PrepareSpec) -> pa.Table:
    """Reader rows -> planning + token columns (spec.schema); rejected rows keep only id/reason."""
    from raylib.reader import row_reasons

    n = table.num_rows
    reasons = row_reasons(table, spec.required, None)
    cols = {c: table.column(c).to_pylist() for c in table.column_names if not c.startswith("_")}
    get = lambda c: cols.get(c) or [None] * n  # noqa: E731
    keys = row_keys(cols, n, spec.seed)
    negatives = [[] for _ in range(n)]
    scores = [[] for _ in range(n)]
    if spec.kind == "mined":
        negatives = [_json_list(v) for v in get("negatives")]
        scores = [_json_list(v) for v in get("negative_scores")]
        for i in range(n):
            if reasons[i] is None and (negatives[i] is None or not all(isinstance(x, str) for x in negatives[i])):
                reasons[i] = "not_list:negatives"
    good = [i for i in range(n) if reasons[i] is None]
    tok = load_text_tokenizer(spec.model, spec.tiny)
    pick = lambda c: [get(c)[i] for i in good]  # noqa: E731
    query_ids = tok(pick("query"), "query", spec.query_max_length, padding=False)["input_ids"] if good else []
    out = {c: [None] * n for c in spec.schema.names}
    out["key"], out["part"], out["id"], out["reason"] = keys, key_partition(keys, spec.partitions), get("id"), reasons
    out["source"] = [REJECTED] * n
    sources = [source_key(s, lang) for s, lang in zip(pick("source"), pick("language"))]
    if spec.kind == "pairs":
        doc_ids = tok(pick("document"), "document", spec.document_max_length, padding=False)["input_ids"] if good else []
        lengths = [len(d) for d in doc_ids]
        for i, q, d in zip(good, query_ids, doc_ids):
            out["query_ids"][i], out["document_ids"][i] = q, d
    else:
        lengths = _prepare_mined(out, good, query_ids, pick("positive"), negatives, scores,
                                 get("positive_score"), tok, spec)
    for i, s in zip(good, length_tags(sources, lengths, spec.length_bounds)):
        out["source"][i] = s
    for c in spec.schema.names:
        if c not in ("source", "part", "key", "id", "reason"):
            out[c] = [([] if c.endswith("ids") or c == "negative_scores" else None) if v is None else v
                      for v in out[c]]
    return pa.table(out, schema=spec.schema)


def _prepare_mined(out: dict, good: list[int], query_ids: list, positives: list[str], negatives: list,
                   scores: list, positive_scores: list, tok: Any, spec: PrepareSpec) -> list[int]:
    """Token ids of each good row's positive and negatives (one tokenizer call), teacher scores;
    returns each row's length: its longest document among positive + first num_negatives."""
    docs, spans = [], []
    for i, pos in zip(good, positives):
        spans.append((len(docs), 1 + len(negatives[i])))
        docs += [pos, *negatives[i]]
    doc_ids = tok(docs, "document", spec.document_max_length, padding=False)["input_ids"] if docs else []
    lengths = []
    for i, q, (start, count) in zip(good, query_ids, spans):
        group = doc_ids[start:start + count]
        out["query_ids"][i], out["positive_ids"][i], out["negatives_ids"][i] = q, group[0], group[1:]
        score = positive_scores[i]
        out["positive_score"][i] = None if score in (None, "") else float(score)
        out["negative_scores"][i] = [float(s) for s in (scores[i] or [])]
        lengths.append(max(len(d) for d in group[:1 + spec.num_negatives]))
    return lengths


def shard_name(source: str, part: int, chunk: int) -> str:
    """A shard file of (source, part), relative to the output:
    shards/<quoted source>/part-PPPPP-CCCCC.parquet."""
    return f"shards/{urllib.parse.quote(source, safe='')}/part-{part:05d}-{chunk:05d}.parquet"


def write_group(group: pa.Table, fs: Any, root: str, row_group_rows: int, row_groups_per_file: int) -> pa.Table:
    """One (source, part) group: sorted by key and written as shards of at most row_groups_per_file
    row groups (rejected rows: counted by reason); returns one metadata row per file (source, part,
    chunk, path, rows, first/last key) or per rejects group. `fs` is the driver's filesystem object
    (pickled: an S3 endpoint and keys travel with it)."""
    source = group.column("source")[0].as_py()
    part = int(group.column("part")[0].as_py())
    if source == REJECTED:
        counts = pc.value_counts(group.column("reason")).to_pylist()
        return pa.table({"source": [source], "part": [part], "chunk": [0], "path": [None],
                         "rows": [group.num_rows], "first_key": [None], "last_key": [None],
                         "rejected": [json.dumps({c["values"]: int(c["counts"]) for c in counts})]})
    order = pc.sort_indices(group, sort_keys=[("key", "ascending"), ("id", "ascending")])
    shard = group.take(order).drop_columns(list(SHARD_DROP))
    per_file = row_group_rows * row_groups_per_file
    meta: dict[str, list] = {k: [] for k in ("source", "part", "chunk", "path", "rows", "first_key",
                                             "last_key", "rejected")}
    for chunk, start in enumerate(range(0, shard.num_rows, per_file)):
        piece = shard.slice(start, per_file)
        name = shard_name(source, part, chunk)
        if chunk == 0:
            fs.create_dir(join(root, name).rsplit("/", 1)[0], recursive=True)
        pq.write_table(piece, join(root, name), filesystem=fs, row_group_size=row_group_rows)
        keys = piece.column("key")
        for k, v in zip(meta, (source, part, chunk, name, piece.num_rows, keys[0].as_py(), keys[-1].as_py(), None)):
            meta[k].append(v)
    return pa.table(meta)


def partitions_for(input_bytes: int, partition_mib: float) -> int:
    """Key ranges per source so that the largest source's groups stay near partition_mib."""
    if partition_mib <= 0:
        raise ValueError(f"partition_mib must be > 0, got {partition_mib}")
    return max(1, math.ceil(input_bytes / (partition_mib * 2 ** 20)))


def build_manifest(meta_rows: list[dict], spec: PrepareSpec, extra: dict) -> dict:
    """Manifest from the written files' metadata: per source its files in key (= plan) order, with
    their row counts; checks that the key ranges of a source's files follow each other."""
    sources: dict[str, list[dict]] = {}
    rejected: dict[str, int] = {}
    for m in meta_rows:
        if m["source"] == REJECTED:
            for reason, count in json.loads(m["rejected"]).items():
                rejected[reason] = rejected.get(reason, 0) + count
            continue
        sources.setdefault(m["source"], []).append(m)
    out = {}
    for source in sorted(sources):
        files = sorted(sources[source], key=lambda m: (m["part"], m["chunk"]))
        for a, b in zip(files, files[1:]):
            if a["last_key"] > b["first_key"]:
                raise RuntimeError(f"shards of {source} overlap in key range: {a['path']}, {b['path']}")
        out[source] = {"rows": sum(m["rows"] for m in files),
                       "files": [{"path": m["path"], "rows": m["rows"]} for m in files]}
    spec_fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}
    spec_fields["tiny"] = dict(spec.tiny)
    return {"format": "raylib-prepared/1", **spec_fields, **extra,
            "rows": sum(s["rows"] for s in out.values()), "rejected": rejected,
            "columns": [c for c in spec.schema.names if c not in SHARD_DROP], "sources": out}


@dataclass
class Prepared:
    """A prepare stage's result as the training driver sees it: where, and the manifest."""

    location: str
    manifest: dict = field(default_factory=dict)
    reused: bool = False
