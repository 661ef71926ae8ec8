"""Exact top-k inner-product search in plain torch: the GPU search where FAISS has no GPU.

FAISS-GPU wheels link CUDA 12; a host with another CUDA (or none of FAISS at all) still has
torch. `TorchFlatIP` keeps the documents on a torch device in fp16/bf16 (or fp32) storage,
proposes candidates with matmul + top-k over tiles of [query chunk x document chunk] (memory
bounded by `tile_bytes`, never [n_queries x n_docs]), then rechecks them in fp32:
  - each candidate's score is recomputed from the fp32 vectors (elementwise products summed in
    fp32: no TF32, no low-precision rounding);
  - a row is certified when its k-th exact score beats the last candidate's low-precision score
    by more than the rounding bound (`rel_error` x |q| x max |d|): no document outside the
    candidates can then be in the top-k. Other rows are searched again by an fp32 scan, wider
    each time, until certified (or the scan covers every document).
Results are ordered by exact score, best first, ties by the smaller document id, so they are
deterministic; `tests/test_torch_search.py` checks them against FAISS's exact CPU search.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator

import numpy as np

STORAGE_DTYPES = ("fp32", "fp16", "bf16")
# Unit roundoff of each storage dtype: the vectors, the query and the matmul's output are each
# rounded once (3u), plus fp32 accumulation over `dim` terms (dim * 2^-24, doubled for slack).
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
DEFAULT_TILE_BYTES = {"cuda": 1 << 30, "cpu": 32 << 20}  # one [queries x docs] score tile


def cuda_present() -> bool:
    """True when torch sees a CUDA device; imports torch only where a GPU driver exists."""
    if "torch" not in sys.modules:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            return False
        if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
            return False
    import torch

    return torch.cuda.is_available()


def rel_error(storage: str, dim: int) -> float:
    """Bound on |low-precision score - exact score| / (|q| max|d|) for one storage dtype."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {storage!r} is not one of {STORAGE_DTYPES}")
    u = UNIT_ROUNDOFF[storage]
    return (3 * u if storage != "fp32" else 0.0) + 2 * dim * 2.0 ** -24


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 matmuls in full fp32 (TF32 would break the fp32 error bound) for the block."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class TorchFlatIP:
    """Exact inner-product top-k over documents [n, d] held on a torch device.

    storage: fp16 | bf16 | fp32 (the copy the matmul reads). The fp32 copy used by the recheck
    lives on the device too (`recheck_on_device`, 6 bytes per value with fp16 storage), or stays
    in host memory (2 bytes per value on the device; candidates are gathered on the host).
    """

    def __init__(self, docs: np.ndarray, device: str | None = None, storage: str = "fp16",
                 recheck_on_device: bool = True, tile_bytes: int | None = None,
                 query_chunk: int = 4096, oversample: float = 2.0):
        import torch

        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage {storage!r} is not one of {STORAGE_DTYPES}")
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        docs = np.ascontiguousarray(docs, dtype=np.float32)
        if docs.ndim != 2 or not len(docs):
            raise ValueError(f"documents must be a non-empty [n, d] array, got {docs.shape}")
        if storage == "fp16" and np.abs(docs).max() >= 65504:
            raise ValueError("document values overflow fp16 storage: use bf16 or fp32")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.storage, self.oversample, self.query_chunk = storage, oversample, query_chunk
        self.tile_bytes = tile_bytes or DEFAULT_TILE_BYTES.get(self.device.type, 32 << 20)
        host = torch.from_numpy(docs)
        self.exact = host.to(self.device) if recheck_on_device else host
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[storage]
        same = storage == "fp32" and recheck_on_device
        self.low = self.exact if same else self._to_device(self.exact, dtype)
        self.max_norm = float(np.sqrt(max(float(np.einsum("nd,nd->n", docs[s:s + 65536], docs[s:s + 65536]).max())
                                          for s in range(0, len(docs), 65536))))

    def _to_device(self, x, dtype):
        """x in `dtype` on the device, converted in chunks (no full-size fp32 staging there)."""
        import torch

        out = torch.empty(x.shape, dtype=dtype, device=self.device)
        for s in range(0, len(x), 262_144):
            out[s:s + 262_144] = x[s:s + 262_144].to(self.device, non_blocking=False).to(dtype)
        return out

    def __len__(self) -> int:
        return self.low.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (scores float32 [nq, k], ids int64 [nq, k]), best first; k <= len(self)."""
        import torch

        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        with torch.no_grad(), _no_tf32():
            for s in range(0, len(queries), self.query_chunk):
                q = torch.from_numpy(queries[s:s + self.query_chunk]).to(self.device)
                cs, ci = self._search_chunk(q, k)
                scores[s:s + len(q)], ids[s:s + len(q)] = cs.cpu().numpy(), ci.cpu().numpy()
        return scores, ids

    def _search_chunk(self, q, k: int):
        """Low-precision candidates, fp32 recheck; uncertified rows rescanned in fp32, wider."""
        n = len(self)
        wide = min(n, max(k, math.ceil(k * self.oversample)))
        approx, cand = self._scan(q, self.low, wide)
        scores, ids, ok = self._recheck(q, approx, cand, k, rel_error(self.storage, q.shape[1]),
                                        exhaustive=wide >= n)
        todo = (~ok).nonzero().flatten()
        while todo.numel():
            wide = min(n, 2 * wide)
            approx, cand = self._scan(q[todo], self.exact, wide)
            s2, i2, ok2 = self._recheck(q[todo], approx, cand, k, rel_error("fp32", q.shape[1]),
                                        exhaustive=wide >= n)
            scores[todo[ok2]], ids[todo[ok2]] = s2[ok2], i2[ok2]
            todo = todo[~ok2]
        return scores, ids

    def _scan(self, q, docs, wide: int):
        """Top-`wide` (scores, ids) of q against `docs` (device or host), one tile at a time."""
        import torch

        q = q.to(docs.dtype) if docs.device == self.device else q
        rows = max(1, self.tile_bytes // (len(q) * docs.element_size()))
        best_s = best_i = None
        for start in range(0, len(docs), rows):
            block = docs[start:start + rows].to(self.device)
            tile = q.to(block.dtype) @ block.T  # [nq, rows]
            ts, ti = tile.topk(min(wide, tile.shape[1]), dim=1)
            ts, ti = ts.float(), ti + start
            if best_s is not None:
                ts, ti = torch.cat([best_s, ts], 1), torch.cat([best_i, ti], 1)
                ts, at = ts.topk(min(wide, ts.shape[1]), dim=1)
                ti = ti.gather(1, at)
            best_s, best_i = ts, ti
        return best_s, best_i

    def _recheck(self, q, approx, cand, k: int, rel: float, exhaustive: bool):
        """fp32 scores of the candidates, top-k by (score desc, id asc), and which rows are
        certified (their k-th score beats every document outside the candidates)."""
        import torch

        by_id, _ = cand.sort(dim=1)
        rows = max(1, self.tile_bytes // (4 * by_id.shape[1] * q.shape[1]))  # [rows, wide, d] fp32
        exact = torch.cat([self._exact_scores(q[s:s + rows], by_id[s:s + rows])
                           for s in range(0, len(q), rows)])  # [nq, wide] fp32
        pos = exact.argsort(dim=1, descending=True, stable=True)[:, :k]  # stable: smaller id first
        scores, ids = exact.gather(1, pos), by_id.gather(1, pos)
        if exhaustive:
            return scores, ids, torch.ones(len(q), dtype=torch.bool, device=self.device)
        bound = approx[:, -1].double() + rel * q.double().norm(dim=1) * self.max_norm + 1e-30
        return scores, ids, scores[:, -1].double() > bound

    def _exact_scores(self, q, ids):
        """fp32 q . d for each row's candidate ids [nq, wide] (elementwise, no TF32)."""
        on_host = self.exact.device != self.device
        gathered = self.exact[ids.cpu()].to(self.device) if on_host else self.exact[ids]
        return (q[:, None, :] * gathered).sum(-1)


def torch_exact_search(queries: np.ndarray, docs: np.ndarray, k: int, device: str | None = None,
                       storage: str = "fp16", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Top-k docs by inner product for each query with `TorchFlatIP`: (scores, ids), best first."""
    return TorchFlatIP(docs, device=device, storage=storage, **kwargs).search(queries, k)
