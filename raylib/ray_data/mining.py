"""Ray glue for teacher scoring and hard-negative mining (the selection logic is raylib.mining).

Flow: pairs (a table via raylib.ray_data.io, or a BEIR split) -> rejects split off -> corpus (the
pairs' documents, plus a given corpus or the BEIR corpus) embedded by an EmbedActor pool -> routed
by text key into `ShardActor`s that each hold one FAISS index of at most ~max_docs_per_shard docs
-> queries embedded by an EmbedActor pool -> a `MineBatch` actor pool searches every shard, merges
the per-shard top-K, applies the rule and fetches the chosen negatives' texts -> Parquet.
Memory: the driver holds one corpus batch at a time and the query->positives key table; no
process ever holds a [queries x corpus] score matrix.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset

from raylib import mining as M
from raylib.ray_data.embed import embed
from raylib.ray_data.io import read_table, split_rejects
from raylib.reader import ROWS_PER_BATCH, row_reasons



# ----------------------------------------------------------------------------- shards
@ray.remote
class ShardActor:
    """One corpus shard: a FAISS exact-IP index over its documents, plus their ids and texts."""

    def __init__(self, use_gpu: bool | None, dtype: str = "fp32", oversample: float = 2.0):
        self.index = M.KeyedIndex(use_gpu=use_gpu, dtype=dtype, oversample=oversample)
        self._ids: list[pa.Array] = []
        self._texts: list[pa.Array] = []

    def add(self, keys: np.ndarray, vectors: np.ndarray, doc_ids: list[str], texts: list[str]) -> int:
        self.index.add(keys, vectors)
        self._ids.append(pa.array(doc_ids, type=pa.string()))
        self._texts.append(pa.array(texts, type=pa.large_string()))
        return len(keys)

    def finalize(self) -> dict:
        first = pa.array(self.index.finalize(), type=pa.int64())
        self.ids = pa.concat_arrays(self._ids).take(first) if self._ids else pa.array([], pa.string())
        self.texts = (pa.concat_arrays(self._texts).take(first) if self._texts
                      else pa.array([], pa.large_string()))
        self._ids, self._texts = [], []
        return {"docs": len(self.index), "duplicates": self.index.duplicates}

    def search(self, queries: np.ndarray, k: int, query_of: np.ndarray, keys: np.ndarray):
        """(top-k scores, top-k keys, scores of (queries[query_of[j]], keys[j]) or nan)."""
        scores, ids = self.index.search(queries, k)
        return scores, ids, self.index.scores_for(queries, query_of, keys)

    def lookup(self, keys: np.ndarray) -> tuple[list, list]:
        rows = self.index.positions(keys)
        assert (rows >= 0).all(), "lookup of a key this shard does not hold"
        take = pa.array(rows, type=pa.int64())
        return self.ids.take(take).to_pylist(), self.texts.take(take).to_pylist()


def _corpus_batch(batch: pa.Table) -> pa.Table:
    """Add `d_key` (text key) and `doc_id` (given id, else the key in hex) to corpus rows."""
    texts = batch.column("document").to_pylist()
    keys = M.text_keys(texts)
    if "doc_id" in batch.column_names:
        ids = [i if i else M.key_hex(k) for i, k in zip(batch.column("doc_id").to_pylist(), keys)]
    else:
        ids = [M.key_hex(k) for k in keys]
    return pa.table({"document": pa.array(texts, pa.string()), "doc_id": pa.array(ids, pa.string()),
                     "d_key": pa.array(keys, pa.int64())})


def build_shards(corpus: Dataset, teacher: Any, r: Any, budget: M.IndexBudget,
                 plan_for: Callable[[int], M.ShardPlan]) -> tuple[list, dict]:
    """Embed `corpus` (document, doc_id) with `teacher` in an actor pool and route it by key into
    shard actors, as many as `plan_for(dim)` says once the first batch gives the teacher's dimension.
    `r`: the mine job's resources section (raylib.jobs.mine.ResourcesConfig)."""
    use_gpu = True if r.shard_num_gpus > 0 else False

    def start(dim: int) -> tuple[M.ShardPlan, list]:
        plan = plan_for(dim)
        return plan, [ShardActor.options(num_cpus=r.shard_num_cpus, num_gpus=r.shard_num_gpus or None)
                      .remote(use_gpu, budget.dtype, budget.oversample) for _ in range(plan.num_shards)]

    plan, shards = None, []
    keyed = corpus.map_batches(_corpus_batch, batch_format="pyarrow", num_cpus=0.25,
                               batch_size=ROWS_PER_BATCH)
    embedded = embed(keyed, teacher, "document", "document", "d_emb",
                     concurrency=r.embed_concurrency, num_gpus=r.embed_num_gpus,
                     batch_size=r.embed_batch_size, num_cpus=r.embed_num_cpus, max_length=r.max_length,
                     num_threads=r.embed_num_threads,
                     tokenize_upstream=r.tokenize_upstream)
    pending: list = []
    routed = 0
    for batch in embedded.iter_batches(batch_size=r.corpus_batch_size, batch_format="numpy"):
        keys, emb = batch["d_key"], batch["d_emb"]
        if plan is None:
            plan, shards = start(emb.shape[1])
        n_shards = len(shards)
        where = M.shard_of(keys, n_shards)
        for i in range(n_shards):
            m = where == i
            if m.any():
                pending.append(shards[i].add.remote(keys[m], emb[m], batch["doc_id"][m].tolist(),
                                                    batch["document"][m].tolist()))
        routed += len(keys)
        if len(pending) > 4 * n_shards:  # bound the batches in flight
            done, pending = ray.wait(pending, num_returns=len(pending) - 2 * n_shards)
            ray.get(done)
    if plan is None:  # an empty corpus: one empty shard
        plan, shards = start(1)
    ray.get(pending)
    stats = ray.get([s.finalize.remote() for s in shards])
    info = {"routed": routed, "shards": len(shards), "docs": sum(s["docs"] for s in stats),
            "duplicates": sum(s["duplicates"] for s in stats),
            "max_docs_in_a_shard": max(s["docs"] for s in stats),
            "index_dtype": budget.dtype, "plan": asdict(plan)}
    if budget.memory_bytes is not None and info["max_docs_in_a_shard"] > plan.docs_per_shard:
        raise AssertionError(f"a shard holds {info['max_docs_in_a_shard']:,} documents, over the "
                             f"{plan.docs_per_shard:,} that index.memory_bytes allows")
    return shards, info


# ----------------------------------------------------------------------------- mining
def positives_table(q_keys: np.ndarray, d_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of known positives: (sorted unique query keys, offsets, positive doc keys)."""
    order = np.lexsort((d_keys, q_keys))
    q, d = q_keys[order], d_keys[order]
    keep = np.ones(len(q), bool)
    keep[1:] = (q[1:] != q[:-1]) | (d[1:] != d[:-1])
    q, d = q[keep], d[keep]
    uq, start = np.unique(q, return_index=True)
    return uq, np.append(start, len(q)).astype(np.int64), d


def known_positives_of(table: tuple[np.ndarray, np.ndarray, np.ndarray], q_keys: np.ndarray,
                       own: np.ndarray) -> list[np.ndarray]:
    """Every known positive key of each row's query (always including the row's own positive)."""
    uq, offsets, d = table
    at = np.searchsorted(uq, q_keys)
    out = []
    for i, (a, qk) in enumerate(zip(at, q_keys)):
        if a < len(uq) and uq[a] == qk:
            out.append(np.union1d(d[offsets[a]:offsets[a + 1]], [own[i]]))
        else:
            out.append(np.asarray([own[i]], np.int64))
    return out


class MineBatch:
    """map_batches callable: search every shard, merge top-K, select negatives, fetch their texts."""

    def __init__(self, shards: list, positives: list, rule: dict, candidates: int, seed: int,
                 order: str):
        self.shards = shards
        self.positives = ray.get(positives[0])
        self.rule = M.NegativeRule(**rule).validate()
        self.k, self.seed, self.order = candidates, seed, order

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        q = np.ascontiguousarray(batch["q_emb"], dtype=np.float32)
        qk, dk = batch["q_key"].astype(np.int64), batch["d_key"].astype(np.int64)
        n = len(qk)
        known = known_positives_of(self.positives, qk, dk)
        flat_keys, row_of = M.flatten_positives(known)
        # the own positive is appended so its score comes back from whichever shard holds it
        all_keys = np.concatenate([flat_keys, dk])
        all_rows = np.concatenate([row_of, np.arange(n)])
        results = ray.get([s.search.remote(q, self.k, all_rows, all_keys) for s in self.shards])
        cand_scores, cand_ids = M.merge_topk([(r[0], r[1]) for r in results], self.k)
        pair_scores = results[0][2]
        for r in results[1:]:
            pair_scores = np.fmax(pair_scores, r[2])
        assert not np.isnan(pair_scores).any(), "a positive is missing from the corpus shards"
        own = pair_scores[len(flat_keys):]
        ref = M.reference_scores(pair_scores[:len(flat_keys)], row_of, own, self.rule.pos_reference)
        rngs = [M.row_seed(self.seed, a, b) for a, b in zip(qk, dk)]
        sel = M.select_negatives(cand_ids, cand_scores, known, ref, self.rule, qk, rngs)
        neg_ids, neg_texts = self._lookup(sel.neg_ids)
        ok = sel.status != M.TOO_FEW_STATUS
        order_key = np.zeros(n)
        if self.order != "random" and ok.any():
            order_key[ok] = M.curriculum_key(own[ok], sel.neg_scores[ok], self.order)
        neg_scores = [list(map(float, s)) if o else [] for s, o in zip(sel.neg_scores, ok)]
        return pa.table({
            "query": pa.array(batch["query"].tolist(), pa.string()),
            "positive": pa.array(batch["document"].tolist(), pa.string()),
            "negatives": pa.array(neg_texts, pa.list_(pa.string())),
            "positive_score": pa.array(own, pa.float32()),
            "negative_scores": pa.array(neg_scores, pa.list_(pa.float32())),
            "source": pa.array(batch["source"].tolist(), pa.string()),
            "language": pa.array(batch["language"].tolist(), pa.string()),
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "query_id": pa.array(batch["query_id"].tolist(), pa.string()),
            "positive_id": pa.array(batch["positive_id"].tolist(), pa.string()),
            "negative_ids": pa.array(neg_ids, pa.list_(pa.string())),
            "status": pa.array(sel.status.tolist(), pa.string()),
            "num_found": pa.array(sel.num_found, pa.int64()),
            "order_key": pa.array(order_key, pa.float64()),
        })

    def _lookup(self, neg_ids: np.ndarray) -> tuple[list[list[str]], list[list[str]]]:
        """Doc ids and texts of the chosen negatives ([] for dropped rows)."""
        flat = neg_ids[neg_ids >= 0]
        uniq = np.unique(flat)
        id_of: dict[int, str] = {}
        text_of: dict[int, str] = {}
        where = M.shard_of(uniq, len(self.shards))
        calls = [(uniq[where == i], self.shards[i].lookup.remote(uniq[where == i]))
                 for i in range(len(self.shards)) if (where == i).any()]
        for keys, ref in calls:
            ids, texts = ray.get(ref)
            for key, i, t in zip(keys.tolist(), ids, texts):
                id_of[key], text_of[key] = i, t
        ids_out, texts_out = [], []
        for row in neg_ids:
            keys = [int(x) for x in row if x >= 0]
            ids_out.append([id_of[x] for x in keys])
            texts_out.append([text_of[x] for x in keys])
        return ids_out, texts_out


# ----------------------------------------------------------------------------- inputs
PAIR_COLUMNS = ("query", "document", "source", "language", "id", "query_id", "positive_id")


def normalize_pairs(batch: pa.Table) -> pa.Table:
    """Good pair rows -> the fixed mining columns plus text keys (ids default to text keys)."""
    n = batch.num_rows
    cols = batch.column_names

    def text(name: str, default: str | None) -> list:
        if name in cols:
            return [None if v is None else str(v) for v in batch.column(name).to_pylist()]
        return [default] * n

    queries, docs = text("query", None), text("document", None)
    qk, dk = M.text_keys(queries), M.text_keys(docs)
    out = {"query": queries, "document": docs, "source": text("source", ""),
           "language": text("language", ""), "id": text("id", None),
           "query_id": text("query_id", None), "positive_id": text("positive_id", None)}
    out["query_id"] = [v or M.key_hex(k) for v, k in zip(out["query_id"], qk)]
    out["positive_id"] = [v or M.key_hex(k) for v, k in zip(out["positive_id"], dk)]
    out["id"] = [v or f"{a}:{b}" for v, a, b in zip(out["id"], out["query_id"], out["positive_id"])]
    table = {k: pa.array(v, pa.string()) for k, v in out.items()}
    table["q_key"] = pa.array(qk, pa.int64())
    table["d_key"] = pa.array(dk, pa.int64())
    return pa.table(table)


def beir_inputs(inp: Any) -> tuple[Dataset, Dataset, Dataset, int, dict[str, int]]:
    """(good pairs, rejects, corpus, input rows, corpus rejects by reason) from a BEIR dir: one pair
    per qrel with grade > 0; qrels naming an unknown query or document, grade <= 0, or texts the
    readers would reject (empty, control characters, ...) are rejects; such corpus documents stay
    out of the index and are counted."""
    from raylib.beir import document_text, load_beir

    data = load_beir(inp.path, inp.split)
    source = inp.source or Path(inp.path).name
    rows, rejects = [], []
    for qid, docs in data.qrels.items():
        for did, grade in docs.items():
            row = {"query": data.queries.get(qid), "document": None, "source": source,
                   "language": inp.language, "id": f"{qid}:{did}", "query_id": qid,
                   "positive_id": did}
            if did in data.corpus:
                row["document"] = document_text(data.corpus[did])
            reason = ("not_positive:grade" if grade <= 0 else "unknown_query" if row["query"] is None
                      else "unknown_document" if row["document"] is None else None)
            if reason:
                rejects.append({**row, "reason": reason})
            else:
                rows.append(row)
    num_input = len(rows) + len(rejects)
    schema = pa.schema([(c, pa.string()) for c in PAIR_COLUMNS])
    pairs = pa.Table.from_pylist(rows, schema=schema)
    reasons = row_reasons(pairs, ["query", "document"], inp.max_chars)
    rejects += [{**row, "reason": r} for row, r in zip(rows, reasons) if r]
    good = ray.data.from_arrow(pairs.filter(pa.array([r is None for r in reasons])))
    rej = ray.data.from_arrow(pa.Table.from_pylist(
        rejects, schema=schema.append(pa.field("reason", pa.string()))))
    ids = list(data.corpus)
    corpus = pa.table({"document": pa.array([document_text(data.corpus[i]) for i in ids], pa.string()),
                       "doc_id": pa.array(ids, pa.string())})
    doc_reasons = row_reasons(corpus, ["document"], inp.max_chars)
    corpus_rejected: dict[str, int] = {}
    for r in filter(None, doc_reasons):
        corpus_rejected[r] = corpus_rejected.get(r, 0) + 1
    corpus = corpus.filter(pa.array([r is None for r in doc_reasons]))
    return good, rej, ray.data.from_arrow(corpus), num_input, dict(sorted(corpus_rejected.items()))


def given_corpus(path: str, max_chars: int | None) -> tuple[Dataset, Dataset]:
    """(documents with doc_id, rejects) of an extra corpus table (column `document`, optional `id`)."""
    good, rej = split_rejects(read_table(path), ["document"], max_chars)

    def keep(batch: pa.Table) -> pa.Table:
        ids = (batch.column("id").to_pylist() if "id" in batch.column_names else [None] * batch.num_rows)
        return pa.table({"document": batch.column("document"),
                         "doc_id": pa.array([None if i is None else str(i) for i in ids], pa.string())})

    return good.map_batches(keep, batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH), rej


def count_reasons(ds: Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in ds.select_columns(["reason"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for r in batch.column("reason").to_pylist():
            counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))


def drop_internal(batch: pa.Table, want_ok: bool) -> pa.Table:
    ok = pa.array([s != M.TOO_FEW_STATUS for s in batch.column("status").to_pylist()])
    if want_ok:
        return batch.filter(ok).drop_columns(["status", "num_found", "order_key"])
    bad = batch.filter(pc.invert(ok))
    return pa.table({"query": bad.column("query"), "positive": bad.column("positive"),
                     "source": bad.column("source"), "language": bad.column("language"),
                     "id": bad.column("id"), "query_id": bad.column("query_id"),
                     "positive_id": bad.column("positive_id"), "positive_score": bad.column("positive_score"),
                     "num_found": bad.column("num_found"),
                     "reason": pa.array(["too_few_negatives"] * bad.num_rows, pa.string())})


# ----------------------------------------------------------------------------- the job


def keep_with_key(batch: pa.Table) -> pa.Table:
    """Kept rows with their curriculum sort key."""
    key = batch.column("order_key")
    out = drop_internal(batch, True)
    ok = pa.array([s != M.TOO_FEW_STATUS for s in batch.column("status").to_pylist()])
    return out.append_column("order_key", key.filter(ok))
