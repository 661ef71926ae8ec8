"""Embedding quantization (int8 with calibrated ranges, binary) and search with float rescoring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Int8Calibration:
    """Per-dimension ranges learnt from calibration embeddings: x -> round((x - lo) / step) - 128."""

    lo: np.ndarray    # [d]
    step: np.ndarray  # [d]

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> "Int8Calibration":
        lo, hi = embeddings.min(0), embeddings.max(0)
        return cls(lo.astype(np.float32), np.maximum((hi - lo) / 255.0, 1e-12).astype(np.float32))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        codes = np.round((x - self.lo) / self.step) - 128
        return np.clip(codes, -128, 127).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return ((codes.astype(np.float32) + 128) * self.step + self.lo).astype(np.float32)


def quantize_binary(x: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 per byte: [n, d] float -> [n, ceil(d/8)] uint8."""
    return np.packbits(x > 0, axis=-1)


def unpack_binary(codes: np.ndarray, dim: int) -> np.ndarray:
    """Packed bits -> [n, dim] of +1/-1 float32."""
    return np.unpackbits(codes, axis=-1)[:, :dim].astype(np.float32) * 2 - 1


def quantized_search(queries: np.ndarray, docs: np.ndarray, k: int, method: str,
                     calibration: np.ndarray | None = None, rescore_multiplier: int = 4,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Retrieve top k*rescore_multiplier with quantized doc codes, rescore them with the float query.

    int8: candidates by float query . dequantized doc codes; binary: candidates by Hamming distance
    (FAISS IndexBinaryFlat). Rescoring uses float query x the stored (dequantized / +-1) doc vectors,
    as sentence-transformers does, so only the quantized corpus needs to be kept.
    """
    import faiss

    from raylib.search import exact_search

    num_candidates = min(len(docs), k * max(rescore_multiplier, 1))
    if method == "int8":
        cal = Int8Calibration.fit(docs if calibration is None else calibration)
        stored = cal.dequantize(cal.quantize(docs))
        _, cand = exact_search(queries, stored, num_candidates)
    elif method == "binary":
        dim = docs.shape[1]
        index = faiss.IndexBinaryFlat(quantize_binary(docs).shape[1] * 8)
        index.add(quantize_binary(docs))
        _, cand = index.search(quantize_binary(queries), num_candidates)
        stored = unpack_binary(quantize_binary(docs), dim) / np.sqrt(dim)
    else:
        raise ValueError(f"quantization must be 'int8' or 'binary', got {method!r}")
    rescored = np.einsum("qd,qkd->qk", queries.astype(np.float32), stored[cand])
    top = np.argsort(-rescored, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rescored, top, 1), np.take_along_axis(cand, top, 1)
