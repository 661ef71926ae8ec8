"""MCLS, multiple CLS (M3 App. B.2): long-text embeddings without long-text finetuning.

"we insert a CLS token for every fixed number of tokens (in our experiments, we insert a "[CLS]"
for each 256 tokens), and each CLS token can capture semantic information from its neighboring
tokens. Ultimately, the final text embedding is obtained by averaging the last hidden states of
all CLS tokens." Applied at inference only, to the dense head.

A tokenized text [CLS] t_1 .. t_n [SEP] becomes [CLS] t_1 .. t_N [CLS] t_N+1 .. t_2N [CLS] .. [SEP]
(N = `every`): one CLS per started chunk of N content tokens, the original CLS the first. The
result never exceeds `max_length` tokens: the inserted CLS tokens take the place of content at
the end (as truncation would). Pure functions; the Encoder runs them (Encoder.encode(mcls=N)).
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_EVERY = 256  # M3 App. B.2


def insert_cls(ids: Sequence[int], cls_id: int, sep_id: int | None, every: int = DEFAULT_EVERY,
               max_length: int | None = None) -> tuple[list[int], list[int]]:
    """One text's token ids with a CLS before every `every` content tokens -> (ids, flags), flags
    1 at the CLS positions (the original first token and each inserted one), else 0."""
    if every < 1:
        raise ValueError(f"mcls must be >= 1 tokens per CLS, got {every}")
    ids = [int(t) for t in ids]
    if not ids or ids[0] != cls_id:
        raise ValueError("MCLS needs token ids that start with the tokenizer's CLS token "
                         f"(id {cls_id}); got {ids[:1]}")
    tail = ids[-1:] if len(ids) > 1 and ids[-1] == sep_id else []
    content = ids[1:len(ids) - len(tail)]
    limit = max_length if max_length is not None else len(ids) + len(content)
    budget = limit - 1 - len(tail)  # room for content + inserted CLS tokens
    if budget < 0:
        raise ValueError(f"max_length {limit} leaves no room for CLS and SEP")
    keep = min(len(content), budget)
    while keep and keep + (keep - 1) // every > budget:  # (keep - 1) // every inserted CLS
        keep -= 1
    out, flags = [cls_id], [1]
    for start in range(0, keep, every):
        if start:
            out.append(cls_id)
            flags.append(1)
        chunk = content[start:min(start + every, keep)]
        out.extend(chunk)
        flags.extend([0] * len(chunk))
    return out + tail, flags + [0] * len(tail)


def mcls_pool(hidden: torch.Tensor, cls_flags: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states at the CLS positions: hidden [B, L, H], flags [B, L] -> [B, H]."""
    flags = cls_flags.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
    return (hidden * flags).sum(1) / flags.sum(1).clamp(min=1)
