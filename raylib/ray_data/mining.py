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

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset

from raylib import mining as M
from raylib.ray_data.embed import embed
from raylib.ray_data.io import ROWS_PER_BATCH, read_table, row_reasons, split_rejects, write_parquet

if TYPE_CHECKING:
    from raylib.jobs.mine import MineJobConfig


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


def index_budget(cfg: MineJobConfig) -> M.IndexBudget:
    """The job's index byte budget (its `index:` section)."""
    return cfg.index.validate()


def shard_plan(cfg: MineJobConfig, num_docs: int, dim: int) -> M.ShardPlan:
    """Shards of `num_docs` teacher vectors of `dim` under the job's budget (GPU shards: GPU bytes)."""
    r = cfg.resources
    return M.plan_shards(num_docs, dim, index_budget(cfg), cfg.candidates, r.mine_batch_size,
                         on_gpu=r.shard_num_gpus > 0, max_docs_per_shard=cfg.max_docs_per_shard)


def build_shards(corpus: Dataset, cfg: MineJobConfig, num_docs: int) -> tuple[list, dict]:
    """Embed `corpus` (document, doc_id) in an actor pool and route it by key into shard actors,
    as many as the byte budget needs once the first batch gives the teacher's dimension."""
    r = cfg.resources
    budget = index_budget(cfg)
    use_gpu = True if r.shard_num_gpus > 0 else False

    def start(dim: int) -> tuple[M.ShardPlan, list]:
        plan = shard_plan(cfg, num_docs, dim)
        return plan, [ShardActor.options(num_cpus=r.shard_num_cpus, num_gpus=r.shard_num_gpus or None)
                      .remote(use_gpu, budget.dtype, budget.oversample) for _ in range(plan.num_shards)]

    plan, shards = None, []
    keyed = corpus.map_batches(_corpus_batch, batch_format="pyarrow", num_cpus=0.25,
                               batch_size=ROWS_PER_BATCH)
    embedded = embed(keyed, cfg.teacher, "document", "document", "d_emb",
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


def _normalize_pairs(batch: pa.Table) -> pa.Table:
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


def _beir_inputs(cfg: MineJobConfig) -> tuple[Dataset, Dataset, Dataset, int, dict[str, int]]:
    """(good pairs, rejects, corpus, input rows, corpus rejects by reason) from a BEIR dir: one pair
    per qrel with grade > 0; qrels naming an unknown query or document, grade <= 0, or texts the
    readers would reject (empty, control characters, ...) are rejects; such corpus documents stay
    out of the index and are counted."""
    from raylib.beir import document_text, load_beir

    data = load_beir(cfg.input.path, cfg.input.split)
    source = cfg.input.source or Path(cfg.input.path).name
    rows, rejects = [], []
    for qid, docs in data.qrels.items():
        for did, grade in docs.items():
            row = {"query": data.queries.get(qid), "document": None, "source": source,
                   "language": cfg.input.language, "id": f"{qid}:{did}", "query_id": qid,
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
    reasons = row_reasons(pairs, ["query", "document"], cfg.input.max_chars)
    rejects += [{**row, "reason": r} for row, r in zip(rows, reasons) if r]
    good = ray.data.from_arrow(pairs.filter(pa.array([r is None for r in reasons])))
    rej = ray.data.from_arrow(pa.Table.from_pylist(
        rejects, schema=schema.append(pa.field("reason", pa.string()))))
    ids = list(data.corpus)
    corpus = pa.table({"document": pa.array([document_text(data.corpus[i]) for i in ids], pa.string()),
                       "doc_id": pa.array(ids, pa.string())})
    doc_reasons = row_reasons(corpus, ["document"], cfg.input.max_chars)
    corpus_rejected: dict[str, int] = {}
    for r in filter(None, doc_reasons):
        corpus_rejected[r] = corpus_rejected.get(r, 0) + 1
    corpus = corpus.filter(pa.array([r is None for r in doc_reasons]))
    return good, rej, ray.data.from_arrow(corpus), num_input, dict(sorted(corpus_rejected.items()))


def _given_corpus(path: str, max_chars: int | None) -> tuple[Dataset, Dataset]:
    """(documents with doc_id, rejects) of an extra corpus table (column `document`, optional `id`)."""
    good, rej = split_rejects(read_table(path), ["document"], max_chars)

    def keep(batch: pa.Table) -> pa.Table:
        ids = (batch.column("id").to_pylist() if "id" in batch.column_names else [None] * batch.num_rows)
        return pa.table({"document": batch.column("document"),
                         "doc_id": pa.array([None if i is None else str(i) for i in ids], pa.string())})

    return good.map_batches(keep, batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH), rej


def _count_reasons(ds: Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in ds.select_columns(["reason"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for r in batch.column("reason").to_pylist():
            counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))


def _drop_internal(batch: pa.Table, want_ok: bool) -> pa.Table:
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
def run_mining(cfg: MineJobConfig) -> dict:
    """Run the mining stages on the current Ray cluster; returns the summary dict (the job,
    raylib.jobs.mine, writes it and reports)."""
    cfg.validate()
    start = time.time()
    r = cfg.resources
    mined_path, rejects_path, too_few_path = cfg.outputs["mined"], cfg.outputs["rejects"], cfg.outputs["too_few"]

    corpus_rejected: dict[str, int] = {}
    if cfg.input.kind == "beir":
        good, rejects, corpus, n_input, corpus_rejected = _beir_inputs(cfg)
    else:
        good, rejects = split_rejects(read_table(cfg.input.path), ["query", "document"],
                                      cfg.input.max_chars)
        corpus, n_input = None, None
    pairs = good.map_batches(_normalize_pairs, batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH).materialize()
    rejects = rejects.materialize()
    rejected = _count_reasons(rejects)
    pair_docs = pairs.select_columns(["document", "positive_id"]).rename_columns({"positive_id": "doc_id"})
    # the pairs' documents always enter the corpus (first, so their ids win on duplicates)
    corpus = pair_docs if corpus is None else pair_docs.union(corpus)
    if cfg.input.corpus:
        extra, extra_rej = _given_corpus(cfg.input.corpus, cfg.input.max_chars)
        corpus = corpus.union(extra)
        extra_rejected = _count_reasons(extra_rej)
        for reason, n in extra_rejected.items():
            corpus_rejected[reason] = corpus_rejected.get(reason, 0) + n
        if extra_rejected:
            write_parquet(extra_rej, cfg.outputs["corpus_rejects"])
    corpus = corpus.materialize()
    n_pairs = pairs.count()
    if n_input is None:  # split_rejects puts every input row in exactly one of good / rejects
        n_input = n_pairs + sum(rejected.values())
    if n_pairs == 0:
        raise ValueError(f"no valid pairs in {cfg.input.path} (rejected: {rejected})")

    shards, shard_info = build_shards(corpus, cfg, corpus.count())

    keys = pairs.select_columns(["q_key", "d_key"]).to_pandas()
    table = positives_table(keys["q_key"].to_numpy(np.int64), keys["d_key"].to_numpy(np.int64))
    del keys
    positives_ref = ray.put(table)

    with_q = embed(pairs, cfg.teacher, "query", "query", "q_emb", concurrency=r.embed_concurrency,
                   num_gpus=r.embed_num_gpus, batch_size=r.embed_batch_size, num_cpus=r.embed_num_cpus,
                   max_length=r.max_length, num_threads=r.embed_num_threads,
                   tokenize_upstream=r.tokenize_upstream)
    mined = with_q.map_batches(
        MineBatch,
        fn_constructor_kwargs=dict(shards=shards, positives=[positives_ref], rule=asdict(cfg.rule()),
                                   candidates=cfg.candidates, seed=cfg.seed, order=cfg.order),
        compute=ray.data.ActorPoolStrategy(size=r.mine_concurrency),
        batch_size=r.mine_batch_size, batch_format="numpy", num_cpus=r.mine_num_cpus,
    ).materialize()

    counts = {"kept": 0, "padded": 0, "dropped_too_few": 0}
    pos_hist = M.ScoreHistogram(bins=cfg.histogram_bins)
    neg_hist = M.ScoreHistogram(bins=cfg.histogram_bins)
    for batch in mined.select_columns(["status", "positive_score", "negative_scores"]).iter_batches(
            batch_format="pyarrow", batch_size=65536):
        status = np.asarray(batch.column("status").to_pylist(), dtype=object)
        ok = status != M.TOO_FEW_STATUS
        counts["kept"] += int(ok.sum())
        counts["padded"] += int((status == M.PADDED).sum())
        counts["dropped_too_few"] += int((~ok).sum())
        pos_hist.add(batch.column("positive_score").to_numpy(zero_copy_only=False)[ok])
        neg_hist.add(pc.list_flatten(batch.column("negative_scores")).to_numpy(zero_copy_only=False))

    kept = mined.map_batches(_drop_internal, fn_args=(True,), batch_format="pyarrow", num_cpus=0.25,
                             batch_size=ROWS_PER_BATCH)
    if cfg.order == "random":
        kept = kept.random_shuffle(seed=cfg.seed)
    else:  # increasing negative hardness (Arctic 2.0 Fig. 2); the key is recomputed from the output
        kept = mined.map_batches(_keep_with_key, batch_format="pyarrow", num_cpus=0.25,
                                 batch_size=ROWS_PER_BATCH) \
            .sort("order_key").drop_columns(["order_key"])
    write_parquet(kept, mined_path)
    if counts["dropped_too_few"]:
        write_parquet(mined.map_batches(_drop_internal, fn_args=(False,), batch_format="pyarrow",
                                        num_cpus=0.25, batch_size=ROWS_PER_BATCH), too_few_path)
    if rejected:
        write_parquet(rejects, rejects_path)
    for s in shards:
        ray.kill(s)

    n_rejected = sum(rejected.values())
    summary = {
        "teacher": cfg.teacher, "strategy": cfg.strategy, "order": cfg.order,
        "counts": {"input": n_input, "rejected": n_rejected, "rejected_by_reason": rejected,
                   "pairs": n_pairs, "dropped_too_few": counts["dropped_too_few"],
                   "padded": counts["padded"], "kept": counts["kept"],
                   "adds_up": (n_input == n_rejected + n_pairs
                               and n_pairs == counts["dropped_too_few"] + counts["kept"])},
        "corpus": {**shard_info, "rejected_by_reason": corpus_rejected},
        "histograms": {"positive_score": pos_hist.to_dict(), "negative_score": neg_hist.to_dict()},
        "outputs": {"mined": mined_path, "rejects": rejects_path if rejected else None,
                    "too_few": too_few_path if counts["dropped_too_few"] else None},
        "config": asdict(cfg),
        "seconds": round(time.time() - start, 1),
    }
    if not summary["counts"]["adds_up"]:
        raise AssertionError(f"mining counts do not add up: {summary['counts']}")
    return summary


def _keep_with_key(batch: pa.Table) -> pa.Table:
    """Kept rows with their curriculum sort key."""
    key = batch.column("order_key")
    out = _drop_internal(batch, True)
    ok = pa.array([s != M.TOO_FEW_STATUS for s in batch.column("status").to_pylist()])
    return out.append_column("order_key", key.filter(ok))
