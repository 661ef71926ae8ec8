"""Hard-negative selection from a teacher's top-K candidates (pure NumPy + FAISS, no Ray).

Arctic-Embed 2.0 §2.4 (after NV-Retriever): the teacher's top documents minus known positives minus
any candidate whose score exceeds `max_pos_ratio` x the positive's score (TopK-PercPos); or an
absolute cap (TopK-Abs); or BGE-M3's ANCE-style random sample from a rank window. Curriculum
orderings of Arctic 2.0 Fig. 2 (margin, mean and min negative score). The Ray job
(raylib/ray_data/mining.py) calls these per batch; `mine_in_memory` is the small-scale reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

STRATEGIES = ("topk_percpos", "topk_abs", "rank_window")
ORDERS = ("random", "margin", "mean_neg", "min_neg")
TOO_FEW = ("drop", "pad")
POS_REFERENCES = ("min", "pair")
KEPT, PADDED, TOO_FEW_STATUS = "kept", "padded", "too_few"


@dataclass
class NegativeRule:
    """How negatives are chosen from the ranked candidates of one query."""

    strategy: str = "topk_percpos"
    num_negatives: int = 10          # Arctic 2.0: 10, BGE-M3: 7
    max_pos_ratio: float = 0.95      # topk_percpos: drop score > ratio x positive score
    max_score: float | None = None   # topk_abs: drop score > max_score
    range_min: int = 0               # rank_window: sample from ranks [range_min, range_max)
    range_max: int = 200
    too_few: str = "drop"            # drop | pad (repeat the found negatives cyclically)
    pos_reference: str = "min"       # min: the weakest known positive of the query sets the cut; pair: the row's own

    def validate(self) -> "NegativeRule":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.too_few not in TOO_FEW:
            raise ValueError(f"too_few {self.too_few!r} is not one of {TOO_FEW}")
        if self.pos_reference not in POS_REFERENCES:
            raise ValueError(f"pos_reference {self.pos_reference!r} is not one of {POS_REFERENCES}")
        if self.strategy == "topk_percpos" and not 0 < self.max_pos_ratio <= 1:
            raise ValueError(f"max_pos_ratio must be in (0, 1], got {self.max_pos_ratio}")
        if self.strategy == "topk_abs" and self.max_score is None:
            raise ValueError("strategy topk_abs needs max_score")
        if self.strategy == "rank_window":
            if not 0 <= self.range_min < self.range_max:
                raise ValueError(f"need 0 <= range_min < range_max, got {self.range_min}, {self.range_max}")
            if self.range_max - self.range_min < self.num_negatives:
                raise ValueError(f"rank window [{self.range_min}, {self.range_max}) is smaller than "
                                 f"num_negatives={self.num_negatives}")
        return self


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """Stable 63-bit keys (>= 0; -1 marks "no document") of texts (blake2b): equal texts get equal
    keys, so duplicates merge."""
    out = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        out[i] = int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(),
                                "little") & 0x7FFFFFFFFFFFFFFF
    return out


def key_hex(key: int) -> str:
    """A readable id for a text key (used when the input carries no document id)."""
    return f"{int(key):016x}"


def percpos_threshold(pos_scores: np.ndarray, max_pos_ratio: float) -> np.ndarray:
    """TopK-PercPos cut: pos - |pos| (1 - ratio), i.e. ratio x pos for pos >= 0 (and still below pos
    when pos < 0). Candidates scoring strictly above it are dropped as likely false negatives."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    return pos - np.abs(pos) * (1.0 - max_pos_ratio)


def row_seed(seed: int, query_key: int, doc_key: int) -> np.random.Generator:
    """A per-row generator: results do not depend on how rows were batched or on which actor."""
    return np.random.default_rng([seed & 0xFFFFFFFF, int(query_key) & 0xFFFFFFFFFFFFFFFF,
                                  int(doc_key) & 0xFFFFFFFFFFFFFFFF])


@dataclass
class Selection:
    neg_ids: np.ndarray      # [n, N] int64 candidate keys, -1 where missing (dropped rows)
    neg_scores: np.ndarray   # [n, N] float32 teacher scores, nan where missing
    num_found: np.ndarray    # [n] negatives found before padding
    status: np.ndarray       # [n] KEPT | PADDED | TOO_FEW_STATUS


def select_negatives(cand_ids: np.ndarray, cand_scores: np.ndarray, known_positives: Sequence[np.ndarray],
                     ref_scores: np.ndarray, rule: NegativeRule, query_keys: np.ndarray,
                     rngs: Sequence[np.random.Generator] | None = None) -> Selection:
    """Pick `rule.num_negatives` negatives per row from ranked candidates [n, K] (id -1 = none).

    Every known positive of the row's query is removed first, and so is a document whose text is the
    query's own (`query_keys` [n], text keys like the documents'): sentence-transformers >= 6.3 does
    the same, since a copy of the query is a false negative, not a hard one. `ref_scores` [n] is the
    positive score the TopK-PercPos cut is relative to. Output negatives are best first.
    """
    n, k = cand_ids.shape
    big_n = rule.num_negatives
    if rule.strategy == "rank_window" and rngs is None:
        raise ValueError("rank_window sampling needs per-row generators")
    neg_ids = np.full((n, big_n), -1, dtype=np.int64)
    neg_scores = np.full((n, big_n), np.nan, dtype=np.float32)
    num_found = np.zeros(n, dtype=np.int64)
    status = np.empty(n, dtype=object)
    if rule.strategy == "topk_percpos":
        cut = percpos_threshold(ref_scores, rule.max_pos_ratio)
    elif rule.strategy == "topk_abs":
        cut = np.full(n, rule.max_score, dtype=np.float64)
    else:
        cut = np.full(n, np.inf)
    for r in range(n):
        # rank order, best first (stable: ties keep the search order)
        order = np.argsort(-cand_scores[r], kind="stable")
        ids, scores = cand_ids[r][order], cand_scores[r][order]
        valid = (ids >= 0) & (ids != query_keys[r]) & ~np.isin(ids, known_positives[r]) & np.isfinite(scores)
        ids, scores = ids[valid], scores[valid]
        if rule.strategy == "rank_window":
            ids, scores = ids[rule.range_min:rule.range_max], scores[rule.range_min:rule.range_max]
            if len(ids) > big_n:
                pick = np.sort(rngs[r].choice(len(ids), size=big_n, replace=False))
                ids, scores = ids[pick], scores[pick]
        else:
            keep = scores.astype(np.float64) <= cut[r]
            ids, scores = ids[keep][:big_n], scores[keep][:big_n]
        found = len(ids)
        num_found[r] = found
        if found == big_n:
            status[r] = KEPT
        elif rule.too_few == "pad" and found > 0:
            idx = np.arange(big_n) % found   # repeat the found negatives cyclically
            ids, scores = ids[idx], scores[idx]
            status[r] = PADDED
        else:
            status[r] = TOO_FEW_STATUS
            continue
        neg_ids[r], neg_scores[r] = ids, scores
    return Selection(neg_ids, neg_scores, num_found, status)


def curriculum_key(pos_scores: np.ndarray, neg_scores: np.ndarray, order: str) -> np.ndarray:
    """Sort key [n] whose ascending order is increasing negative hardness (Arctic 2.0 Fig. 2):
    margin = mean(pos - neg) (large margin = easy, first), mean_neg, min_neg."""
    neg = np.asarray(neg_scores, dtype=np.float64)
    pos = np.asarray(pos_scores, dtype=np.float64)
    if order == "margin":
        return -np.mean(pos[:, None] - neg, axis=1)
    if order == "mean_neg":
        return np.mean(neg, axis=1)
    if order == "min_neg":
        return np.min(neg, axis=1)
    raise ValueError(f"order {order!r} has no sort key (one of {ORDERS[1:]})")


class ScoreHistogram:
    """Fixed-edge histogram that accumulates over batches (scores outside the edges are counted)."""

    def __init__(self, lo: float = -1.0, hi: float = 1.0, bins: int = 20):
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.below = self.above = self.total = 0
        self.sum = 0.0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        self.total += len(v)
        self.sum += float(v.sum())
        self.below += int((v < self.edges[0]).sum())
        self.above += int((v > self.edges[-1]).sum())
        self.counts += np.histogram(v, bins=self.edges)[0]

    def to_dict(self) -> dict:
        return {"edges": [round(float(e), 4) for e in self.edges], "counts": self.counts.tolist(),
                "below": self.below, "above": self.above, "count": self.total,
                "mean": round(self.sum / self.total, 6) if self.total else None}


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores [n, k_i], ids [n, k_i]) into the global top-k, best first; ties keep
    shard order. Missing slots are (-inf, -1)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


FP16_REL_ERROR = 2.0 ** -10  # fp16 rounding of stored vectors and (GPU) queries: <= 2^-11 each


class KeyedIndex:
    """Exact inner-product index over documents with int64 keys; duplicates (same key) kept once.

    One shard of the corpus: `add` batches, `finalize`, then `search` and `scores_for` keys.
    Storage: fp32 (CPU: no FAISS copy, `faiss.knn` over the host vectors; GPU: a flat fp32 index)
    or fp16 (GPU `useFloat16`, CPU IndexScalarQuantizer). An fp16 index only proposes
    `oversample` x k candidates: they are re-scored from the fp32 host vectors and a row whose
    top-k could still miss a document (fp16 error bound) is searched again wider, then exactly.
    On CUDA without a GPU FAISS the shard is a `raylib.torch_search.TorchFlatIP` (fp16 or fp32
    storage on the GPU, fp32 recheck from the host vectors: exact top-k); `backend="torch"`
    forces it (on the CPU where there is no GPU).
    """

    def __init__(self, use_gpu: bool | None = None, dtype: str = "fp32", oversample: float = 2.0,
                 backend: str | None = None):
        from raylib.search import INDEX_DTYPES

        if dtype not in INDEX_DTYPES:
            raise ValueError(f"index dtype {dtype!r} is not one of {INDEX_DTYPES}")
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.use_gpu, self.dtype, self.oversample, self.backend = use_gpu, dtype, oversample, backend
        self.torch_index = None
        self._keys: list[np.ndarray] = []
        self._vecs: list[np.ndarray] = []
        self.index = None
        self.keys = np.empty(0, dtype=np.int64)
        self.duplicates = 0
        self.rechecked_rows = 0  # fp16: rows searched again because the bound did not certify them

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        assert self.index is None, "add after finalize"
        keys = np.asarray(keys, dtype=np.int64)
        if (keys < 0).any():
            raise ValueError("document keys must be >= 0 (-1 marks a missing candidate)")
        self._keys.append(keys)
        self._vecs.append(np.asarray(vectors, dtype=np.float32))

    def finalize(self) -> np.ndarray:
        """Deduplicate by key (first occurrence wins), build the FAISS index; returns the kept rows'
        positions in add order. Host peak ~1x the vectors (batches are moved, not concatenated)."""
        from raylib.search import flat_ip_index, search_backend

        keys = np.concatenate(self._keys) if self._keys else np.empty(0, dtype=np.int64)
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)
        self.duplicates = len(keys) - len(first)
        self.keys = keys[first]
        self.vectors = _compact(self._vecs, first)
        self._keys, self._vecs = [], []
        self._sorted = np.argsort(self.keys, kind="stable")
        self.max_norm = float(np.sqrt(_max_sq_norm(self.vectors))) if len(first) else 0.0
        which = search_backend(self.use_gpu, self.backend) if len(self.keys) else "faiss"
        self.on_gpu = which == "faiss-gpu"
        if which == "torch":
            from raylib.torch_search import TorchFlatIP, cuda_present

            self.torch_index = TorchFlatIP(self.vectors, "cuda" if cuda_present() else "cpu",
                                           self.dtype, recheck_on_device=False,
                                           oversample=self.oversample)
        elif len(self.keys) and (self.on_gpu or self.dtype == "fp16"):
            self.index = flat_ip_index(self.vectors, self.on_gpu, self.dtype)
        return first

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, keys) [n, k] of this shard, padded with (-inf, -1)."""
        n = len(queries)
        if not len(self.keys):
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        kk = min(k, len(self.keys))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.torch_index is not None:
            scores, pos = self.torch_index.search(queries, kk)
        elif self.dtype == "fp16":
            scores, pos = self._search_fp16(queries, kk)
        else:
            scores, pos = self._search_fp32(queries, kk)
        keys = np.where(pos >= 0, self.keys[np.maximum(pos, 0)], -1)
        return merge_topk([(scores, keys)], k)

    def _search_fp32(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact fp32 search: the GPU index, or faiss.knn over the host vectors (same kernel as
        IndexFlatIP.search, without a second copy of the shard)."""
        import faiss

        if self.index is not None and self.dtype == "fp32":
            return self.index.search(queries, k)
        return faiss.knn(queries, self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)

    def _search_fp16(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """fp16 candidates re-scored in fp32: rows whose k-th exact score does not clear the
        fp16 error bound above the last candidate are searched again wider, then exactly."""
        from raylib.search import GPU_MAX_K

        limit = min(len(self.keys), GPU_MAX_K if self.on_gpu else len(self.keys))
        scores = np.empty((len(queries), k), np.float32)
        pos = np.empty((len(queries), k), np.int64)
        todo = np.arange(len(queries))
        wide = min(limit, max(k, int(np.ceil(k * self.oversample))))
        if wide < k:  # more candidates than a GPU search returns: exact scan of the host copy
            return self._search_exact_host(queries, k)
        while len(todo):
            approx, cand = self.index.search(queries[todo], wide)
            s, p, ok = self._rescore(queries[todo], approx, cand, k, exhaustive=wide >= len(self.keys))
            scores[todo[ok]], pos[todo[ok]] = s[ok], p[ok]
            todo = todo[~ok]
            self.rechecked_rows += len(todo)
            if wide >= limit and len(todo):  # GPU k cap reached: exact fp32 scan of the host copy
                scores[todo], pos[todo] = self._search_exact_host(queries[todo], k)
                break
            wide = min(limit, wide * 2)
        return scores, pos

    def _rescore(self, queries: np.ndarray, approx: np.ndarray, cand: np.ndarray, k: int,
                 exhaustive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact scores of the candidates (float64 sums of the fp32 vectors, rounded to fp32),
        top-k by them (ties: fp16 order), and whether each row's top-k is certified complete."""
        safe = np.maximum(cand, 0)
        exact = np.einsum("nd,nkd->nk", queries.astype(np.float64),
                          self.vectors[safe].astype(np.float64)).astype(np.float32)
        exact = np.where(cand >= 0, exact, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        s, p = np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)
        if exhaustive:
            return s, p, np.ones(len(s), bool)
        dim = queries.shape[1]
        eps = (FP16_REL_ERROR + dim * 2.0 ** -23) * np.linalg.norm(queries, axis=1) * self.max_norm
        ok = s[:, -1].astype(np.float64) > approx[:, -1].astype(np.float64) + eps + 1e-30
        return s, p, ok

    def _search_exact_host(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact fp32 search over the host vectors, re-scored like the fp16 path's certified rows."""
        import faiss

        approx, cand = faiss.knn(queries, self.vectors, min(len(self.keys), 2 * k),
                                 metric=faiss.METRIC_INNER_PRODUCT)
        s, p, _ = self._rescore(queries, approx, cand, k, exhaustive=True)
        return s, p

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in this shard, -1 where absent."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        at = np.searchsorted(self.keys[self._sorted], keys)
        at = np.minimum(at, len(self.keys) - 1)
        rows = self._sorted[at]
        return np.where(self.keys[rows] == keys, rows, -1)

    def scores_for(self, queries: np.ndarray, query_of: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Score of (queries[query_of[j]], doc keys[j]) for each j; nan where the key is not here."""
        rows = self.positions(keys)
        out = np.full(len(keys), np.nan, dtype=np.float32)
        have = rows >= 0
        if have.any():
            q = np.asarray(queries, dtype=np.float32)[np.asarray(query_of)[have]]
            out[have] = np.einsum("ij,ij->i", q, self.vectors[rows[have]])
        return out


def _compact(batches: list[np.ndarray], keep: np.ndarray) -> np.ndarray:
    """Rows `keep` (sorted) of the concatenated batches, with ~1x their size at peak: batches are
    moved into one array (each freed after its copy), then kept rows are moved down in place."""
    if not len(keep):
        return np.empty((0, batches[0].shape[1] if batches else 1), np.float32)
    total = sum(len(b) for b in batches)
    out = np.empty((total, batches[0].shape[1]), np.float32)
    at = 0
    while batches:
        b = batches.pop(0)
        out[at:at + len(b)] = b
        at += len(b)
        del b
    if len(keep) == total:
        return out
    for s in range(0, len(keep), 65536):  # keep[i] >= i: reads stay ahead of writes
        part = keep[s:s + 65536]
        out[s:s + len(part)] = out[part]
    return out[:len(keep)].copy() if len(keep) < total // 2 else out[:len(keep)]


def _max_sq_norm(vectors: np.ndarray, chunk: int = 65536) -> float:
    """Largest squared row norm, in chunks (no [n, d] temporary)."""
    return max(float(np.einsum("nd,nd->n", vectors[s:s + chunk], vectors[s:s + chunk]).max())
               for s in range(0, len(vectors), chunk))


def flatten_positives(known_positives: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-row key arrays -> (keys [m], row of each key [m])."""
    lengths = np.array([len(p) for p in known_positives], dtype=np.int64)
    keys = np.concatenate([np.asarray(p, dtype=np.int64) for p in known_positives]) if len(lengths) \
        else np.empty(0, np.int64)
    return keys, np.repeat(np.arange(len(known_positives)), lengths)


def reference_scores(pos_scores_flat: np.ndarray, row_of: np.ndarray, own_scores: np.ndarray,
                     pos_reference: str) -> np.ndarray:
    """The positive score each row's cut is relative to: its own, or the minimum over every known
    positive of its query (sentence-transformers' choice; the safer one against false negatives)."""
    if pos_reference == "pair":
        return np.asarray(own_scores, dtype=np.float64)
    ref = np.asarray(own_scores, dtype=np.float64).copy()
    ok = np.isfinite(pos_scores_flat)
    np.minimum.at(ref, row_of[ok], pos_scores_flat[ok].astype(np.float64))
    return ref


def num_doc_shards(num_docs: int, max_docs_per_shard: int | None) -> int:
    """Shards needed so that none holds more than max_docs_per_shard documents (None: one index)."""
    if max_docs_per_shard is None:
        return 1
    if max_docs_per_shard < 1:
        raise ValueError(f"max_docs_per_shard must be >= 1, got {max_docs_per_shard}")
    return max(1, -(-num_docs // max_docs_per_shard))


@dataclass
class IndexBudget:
    """Memory budget of one mining shard's index, in bytes (the mining job's `index:` section).

    memory_bytes is the memory one shard may use on its device: GPU memory for GPU shards
    (`resources.shard_num_gpus > 0`), host RAM for CPU shards; None keeps `max_docs_per_shard`.
    """

    memory_bytes: int | None = None   # per shard: GPU bytes (GPU shards) or host bytes (CPU shards)
    dtype: str = "fp32"               # index storage: fp32 | fp16 (GPU useFloat16 / CPU SQfp16), rechecked in fp32
    workspace_bytes: int = 3 << 30    # FAISS search workspace: GPU temp memory (1.5 GiB default cap)
                                      # + CUDA context and cuBLAS (~1 GiB) + slack; CPU: BLAS blocks
    oversample: float = 2.0           # fp16: candidates fetched per wanted one before the fp32 recheck
    hash_sigmas: float = 6.0          # shards are cut by key hash: room for this many std devs of size noise

    def validate(self) -> "IndexBudget":
        from raylib.search import INDEX_DTYPES

        if self.dtype not in INDEX_DTYPES:
            raise ValueError(f"index.dtype {self.dtype!r} is not one of {INDEX_DTYPES}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ValueError(f"index.memory_bytes must be >= 1, got {self.memory_bytes}")
        if self.workspace_bytes < 0 or self.oversample < 1 or self.hash_sigmas < 0:
            raise ValueError("index.workspace_bytes >= 0, index.oversample >= 1 and "
                             "index.hash_sigmas >= 0 are required")
        return self


@dataclass
class ShardPlan:
    """How a corpus is cut into shard indexes that each fit one device's budget."""

    num_shards: int
    docs_per_shard: int        # capacity: most documents one shard's index may hold
    expected_docs: int         # num_docs / num_shards (hash cuts vary by ~sqrt of it)
    bytes_per_doc: int         # on the budget's device
    reserved_bytes: int        # workspace + query batch + results + add staging
    index_bytes: int           # bytes_per_doc x docs_per_shard
    host_bytes_per_doc: int    # host RAM per document of a shard actor (vectors, keys), texts aside

    def shards_for(self, num_docs: int) -> int:
        """Shards for `num_docs` (e.g. documents so far, streaming) under this plan's capacity."""
        return max(1, -(-num_docs // max(1, self.docs_per_shard)))


def index_bytes_per_doc(dim: int, dtype: str, on_gpu: bool) -> tuple[int, int]:
    """(budget-device bytes, host bytes) per document: the GPU holds the index (2 or 4 B per dim);
    the host keeps fp32 vectors (exact rescoring, scores_for) and two int64 (key, sort order)."""
    item = 2 if dtype == "fp16" else 4
    host = 4 * dim + 16 + (0 if on_gpu or dtype == "fp32" else item * dim)  # CPU fp16: codes too
    return (item * dim if on_gpu else host), host


def search_reserve_bytes(dim: int, candidates: int, query_batch: int, budget: IndexBudget,
                         on_gpu: bool) -> int:
    """Budget bytes kept free of index data: workspace, one query batch (fp32, plus its fp16 copy
    on an fp16 GPU index), its results (scores fp32 + ids int64 per fetched candidate), and the
    fp32 staging of one GPU add chunk."""
    from raylib.search import GPU_ADD_CHUNK

    fetched = candidates * (budget.oversample if budget.dtype == "fp16" else 1)
    queries = query_batch * dim * (4 + (2 if on_gpu and budget.dtype == "fp16" else 0))
    results = int(query_batch * fetched * 12)
    staging = GPU_ADD_CHUNK * dim * 4 if on_gpu else 0
    return budget.workspace_bytes + queries + results + staging


def plan_shards(num_docs: int, dim: int, budget: IndexBudget, candidates: int, query_batch: int,
                on_gpu: bool, max_docs_per_shard: int | None = None) -> ShardPlan:
    """Shards whose index fits `budget.memory_bytes` (less the search reserve) on its device.

    Documents go to shards by key hash, so each shard's size is about num_docs / shards +-
    sqrt of it: the number of shards leaves `hash_sigmas` standard deviations of room. Without
    memory_bytes only max_docs_per_shard cuts (the old count-based plan). A budget that cannot
    hold one document next to its reserve is a ValueError.
    """
    budget.validate()
    if dim < 1 or num_docs < 0 or candidates < 1 or query_batch < 1:
        raise ValueError(f"need dim, candidates, query_batch >= 1 and num_docs >= 0, got "
                         f"{dim}, {candidates}, {query_batch}, {num_docs}")
    per_doc, host = index_bytes_per_doc(dim, budget.dtype, on_gpu)
    reserve = search_reserve_bytes(dim, candidates, query_batch, budget, on_gpu)
    if budget.memory_bytes is None:  # the count-based plan, unchanged: ceil(num_docs / max)
        shards = num_doc_shards(num_docs, max_docs_per_shard)
        cap = max_docs_per_shard if max_docs_per_shard is not None else max(num_docs, 1)
        return ShardPlan(shards, cap, -(-num_docs // shards), per_doc, reserve, per_doc * cap, host)
    fits = (budget.memory_bytes - reserve) // per_doc
    if fits < 1:
        raise ValueError(
            f"index.memory_bytes={budget.memory_bytes:,} cannot hold one {dim}-d {budget.dtype} "
            f"document: {per_doc} B per document + {reserve:,} B reserved (workspace "
            f"{budget.workspace_bytes:,} + a {query_batch}-query batch and its results)")
    cap = int(fits) if max_docs_per_shard is None else min(max_docs_per_shard, int(fits))
    if cap < 1:
        raise ValueError(f"max_docs_per_shard must be >= 1, got {cap}")
    z = budget.hash_sigmas
    room = ((-z + np.sqrt(z * z + 4.0 * cap)) / 2.0) ** 2  # e + z sqrt(e) <= cap
    shards = max(1, int(np.ceil(num_docs / max(room, 1.0)))) if num_docs > cap else 1
    return ShardPlan(shards, cap, -(-num_docs // shards), per_doc, reserve, per_doc * cap, host)


def shard_of(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each document key: by key, so duplicates of a text always meet in one shard."""
    return np.mod(np.asarray(keys, dtype=np.int64), n_shards)


def search_shards(shards: Sequence[KeyedIndex], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k over several shards: per-shard top-k, then merged (never a [queries x corpus] matrix)."""
    return merge_topk([s.search(queries, k) for s in shards], k)


def mine_in_memory(query_emb: np.ndarray, query_keys: np.ndarray, own_pos_keys: np.ndarray,
                   known_positives: Sequence[np.ndarray], doc_emb: np.ndarray, doc_keys: np.ndarray,
                   rule: NegativeRule, candidates: int, max_docs_per_shard: int | None = None,
                   seed: int = 0) -> tuple[Selection, np.ndarray, np.ndarray]:
    """Small-scale reference of the whole mining step for rows (query, own positive):
    returns (selection, own positive scores [n], reference scores [n])."""
    rule.validate()
    n_shards = num_doc_shards(len(doc_keys), max_docs_per_shard)
    where = shard_of(doc_keys, n_shards)
    shards = []
    for i in range(n_shards):
        s = KeyedIndex(use_gpu=False)
        s.add(doc_keys[where == i], doc_emb[where == i])
        s.finalize()
        shards.append(s)
    cand_scores, cand_ids = search_shards(shards, query_emb, candidates)
    n = len(query_keys)
    own = np.full(n, np.nan, np.float32)
    flat_keys, row_of = flatten_positives(known_positives)
    flat_scores = np.full(len(flat_keys), np.nan, np.float32)
    for s in shards:
        own = np.fmax(own, s.scores_for(query_emb, np.arange(n), own_pos_keys))
        flat_scores = np.fmax(flat_scores, s.scores_for(query_emb, row_of, flat_keys))
    ref = reference_scores(flat_scores, row_of, own, rule.pos_reference)
    rngs = [row_seed(seed, q, d) for q, d in zip(query_keys, own_pos_keys)]
    return select_negatives(cand_ids, cand_scores, known_positives, ref, rule, query_keys, rngs), own, ref
