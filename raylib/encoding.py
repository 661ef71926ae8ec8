"""The one encode loop every backend runs: input checks, length sorting, padding, and the
dense / sparse / multi-vector outputs put back in input order.

`BatchEncoder` holds the loop; a backend supplies `_forward(input_ids, mask, dense, sparse,
multivector, cls_flags)` on one padded NumPy batch and returns float32 NumPy arrays per head
(dense [B, H], sparse [B, L] token weights, multivector [B, L-1, H']). The torch backend is
`raylib.model.Encoder` itself; the ONNX Runtime backends are in `raylib.backends`. NumPy only:
no torch, no Ray.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class BatchEncoder:
    """Texts or token id rows -> embeddings, in length-sorted padded batches; see module doc."""

    tokenizer: Any
    text_tokenizer: Any  # raylib.model.TextTokenizer: prefixes and truncation
    settings: Any
    backend: str

    # what a backend defines (the torch Encoder as properties, the ONNX backend as attributes)
    dim: int
    has_sparse: bool
    has_multivector: bool
    multivector_dim: int | None
    device: Any

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, dense: bool, sparse: bool,
                 multivector: bool, cls_flags: np.ndarray | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def mcls_rows(self, input_ids: Sequence[Sequence[int]], every: int, dense: bool = True,
                  sparse: bool = False, multivector: bool = False) -> tuple[list, list]:
        raise ValueError(f"mcls needs the torch backend, not {self.backend}")

    def tokenize(self, texts: Sequence[str], kind: str = "document", max_length: int | None = None,
                 padding: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def prefix(self, kind: str) -> str:
        """The query or document prefix the model's settings name."""
        return self.text_tokenizer.prefix(kind)

    def encode(self, texts: str | Sequence[str], kind: str = "document", dense: bool = True,
               sparse: bool = False, multivector: bool = False, dim: int | None = None,
               batch_size: int = 64, max_length: int | None = None,
               show_progress: bool = False, mcls: int | None = None) -> dict[str, Any]:
        """Encode texts for retrieval; sorts by length to batch, no grad (bf16 autocast on GPU).

        Returns a dict with the requested keys:
          dense:       float32 [n, d] L2-normalized (truncated to `dim` and renormalized if set)
          sparse:      list of {token_id: weight}, max weight per distinct non-special token
          multivector: list of float32 [len_i, d'] arrays (tokens after CLS)
        `mcls=N`: dense = mean of the last hidden states of a CLS inserted every N tokens (M3 App.
        B.2, raylib.mcls; N = 256 in the paper), dense head only, torch backend only.
        """
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(check_texts(texts), kind, max_length, padding=False)
        return self.encode_features(tokens["input_ids"], dense, sparse, multivector, dim, batch_size,
                                    show_progress, desc=f"encode ({kind})", mcls=mcls)

    def encode_features(self, input_ids: Sequence[Sequence[int]], dense: bool = True,
                        sparse: bool = False, multivector: bool = False, dim: int | None = None,
                        batch_size: int = 64, show_progress: bool = False,
                        desc: str = "encode", mcls: int | None = None) -> dict[str, Any]:
        """Encode already tokenized texts (unpadded id rows, prefixes and truncation applied, as
        `tokenize(..., padding=False)` gives): the model half of `encode`, same outputs, so that
        token ids made in another process (a CPU task upstream of a GPU actor) encode exactly as
        `encode` would."""
        self._check_request(input_ids, sparse, multivector, dim, batch_size)
        cls_flags = None
        if mcls:  # M3 App. B.2: CLS every `mcls` tokens, within the model's max_length
            input_ids, cls_flags = self.mcls_rows(input_ids, mcls, dense, sparse, multivector)
        order = np.argsort([-len(ids) for ids in input_ids], kind="stable")
        side = getattr(self.tokenizer, "padding_side", "right")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dense_out: list[np.ndarray] = []
        sparse_out: list[dict[int, float]] = []
        multi_out: list[np.ndarray] = []
        for start in _progress(range(0, len(input_ids), batch_size), show_progress, desc):
            rows = order[start:start + batch_size]
            ids, mask = pad_rows([input_ids[i] for i in rows], pad_id, side)
            flags = None if cls_flags is None else pad_rows([cls_flags[i] for i in rows], 0, side)[0]
            out = self._forward(ids, mask, dense, sparse, multivector, flags)
            if dense:
                dense_out.append(out["dense"])
            if sparse:
                keep = mask.astype(bool) & ~np.isin(ids, self.special_token_ids)
                sparse_out.extend(sparse_dicts(ids, out["sparse"] * keep))
            if multivector:  # tokens after CLS
                multi_out.extend(out["multivector"][j, :n - 1] for j, n in enumerate(mask.sum(1)))
        return unsort_outputs(order, dense_out if dense else None, sparse_out if sparse else None,
                              multi_out if multivector else None, dim)

    def _check_request(self, input_ids: Sequence, sparse: bool, multivector: bool,
                       dim: int | None, batch_size: int) -> None:
        """ValueErrors for what this model cannot give or the caller got wrong."""
        if len(input_ids) == 0:
            raise ValueError("input_ids is empty: nothing to encode")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sparse and not self.has_sparse:
            raise ValueError("this model has no sparse head (add_m3_heads() adds one)")
        if multivector and not self.has_multivector:
            raise ValueError("this model has no multi-vector head (add_m3_heads() adds one)")
        if dim is not None and not 0 < dim <= self.dim:
            raise ValueError(f"dim must be in 1..{self.dim}, got {dim}")

    @property
    def special_token_ids(self) -> np.ndarray:
        """Ids whose sparse weight is always 0 (CLS, SEP, EOS, BOS, PAD, UNK)."""
        tok = self.tokenizer
        special = {tok.cls_token_id, tok.sep_token_id, tok.eos_token_id, tok.bos_token_id,
                   tok.pad_token_id, tok.unk_token_id}
        return np.asarray(sorted(i for i in special if i is not None), np.int64)

    def info(self) -> dict:
        """What a server needs to validate requests and describe the model."""
        return {"dim": self.dim, "has_sparse": self.has_sparse,
                "has_multivector": self.has_multivector, "multivector_dim": self.multivector_dim,
                "max_length": self.settings.max_length, "device": str(self.device),
                "backend": self.backend, "matryoshka_dims": list(self.settings.matryoshka_dims)}


def _progress(starts: range, show: bool, desc: str) -> Any:
    if not show:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=desc, unit="batch")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Unpadded token id rows -> (input_ids, attention_mask) [B, max len] int64, padded on `side`."""
    lengths = [len(row) for row in rows]
    width = max(lengths)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, (row, n) in enumerate(zip(rows, lengths)):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        input_ids[j, cols] = np.asarray(row, dtype=np.int64)
        mask[j, cols] = 1
    return input_ids, mask


def sparse_dicts(input_ids: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    """Per row: {token_id: max weight over its occurrences}, zero weights dropped."""
    out = []
    for ids, w in zip(input_ids, weights):
        row: dict[int, float] = {}
        nz = np.nonzero(w > 0)[0]
        for token, weight in zip(ids[nz].tolist(), w[nz].tolist()):
            if weight > row.get(token, 0.0):
                row[token] = weight
        out.append(row)
    return out


def unsort_outputs(order: np.ndarray, dense_out: list[np.ndarray] | None,
                   sparse_out: list[dict] | None, multi_out: list[np.ndarray] | None,
                   dim: int | None = None) -> dict[str, Any]:
    """Put per-batch outputs of length-sorted texts (`order`) back in input order: dense [n, H]
    float32 (truncated to `dim`), sparse dicts, multi-vectors [L_i, H'] float32; None for a head
    that was not asked for."""
    inverse = np.argsort(order)
    result: dict[str, Any] = {}
    if dense_out is not None:
        emb = np.concatenate(dense_out)[inverse].astype(np.float32)
        result["dense"] = truncate_dims(emb, dim) if dim else emb
    if sparse_out is not None:
        result["sparse"] = [sparse_out[i] for i in inverse]
    if multi_out is not None:
        result["multivector"] = [np.ascontiguousarray(multi_out[i], np.float32) for i in inverse]
    return result


def truncate_dims(emb: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka: keep the first `dim` dimensions and re-normalize."""
    cut = emb[..., :dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)


def check_texts(texts: Any) -> list[str]:
    """Reject what would crash deep in the tokenizer with a ValueError naming the bad item."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace only")
    return texts
