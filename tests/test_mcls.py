"""MCLS (M3 App. B.2): Encoder.encode(mcls=N) against a slow reference that inserts the CLS tokens
by hand and averages their last hidden states, one text at a time, unpadded."""

import numpy as np
import pytest
import torch

from raylib.mcls import insert_cls
from raylib.tiny import _WORDS, tiny_encoder

WORDS = sorted(set(_WORDS))


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 40, size=n)]


def _slow_mcls(encoder, text: str, every: int, kind: str = "document") -> np.ndarray:
    """Tokenize, put a CLS before content tokens every+1, 2*every+1, ..., cut content from the end
    until it fits max_length, run the backbone on this one row, average the CLS rows, normalize."""
    tok = encoder.tokenizer
    ids = encoder.tokenize([text], kind, padding=False)["input_ids"][0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    content = list(ids[1:-1])
    while True:
        seq, cls_at = [tok.cls_token_id], [0]
        for n, t in enumerate(content):
            if n > 0 and n % every == 0:
                cls_at.append(len(seq))
                seq.append(tok.cls_token_id)
            seq.append(t)
        seq.append(tok.sep_token_id)
        if len(seq) <= encoder.settings.max_length:
            break
        content = content[:-1]
    with torch.no_grad():
        hidden = encoder.backbone(input_ids=torch.tensor([seq])).last_hidden_state[0]
    states = [hidden[i] for i in cls_at]
    mean = sum(states) / len(states)
    return (mean / mean.norm()).numpy()


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_mcls_is_the_mean_of_the_inserted_cls_states(arch):
    encoder = tiny_encoder(arch=arch, hidden_size=32, num_layers=2, max_length=24, seed=3)
    texts = _texts(9, 0) + ["one"]  # lengths 1..40 words: 1 to 4 CLS tokens, some cut at max_length
    every = 5
    got = encoder.encode(texts, mcls=every, batch_size=3)["dense"]
    ref = np.stack([_slow_mcls(encoder, t, every) for t in texts])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    lengths = [len(encoder.tokenize([t], padding=False)["input_ids"][0]) for t in texts]
    assert max(lengths) == 24 and min(lengths) < every  # cut texts and single-CLS texts both tested
    # a text shorter than one chunk has one CLS: MCLS = CLS pooling (this tiny model pools by CLS)
    short = [t for t, n in zip(texts, lengths) if n - 2 <= every]
    np.testing.assert_allclose(encoder.encode(short, mcls=every)["dense"],
                               encoder.encode(short)["dense"], atol=1e-5)
    # Matryoshka truncation applies to the MCLS embedding as to any dense one
    cut = encoder.encode(texts[:3], mcls=every, dim=8)["dense"]
    np.testing.assert_allclose(cut, got[:3, :8] / np.linalg.norm(got[:3, :8], axis=1, keepdims=True),
                               atol=1e-6)


def test_insert_cls_positions_and_bad_input():
    ids, flags = insert_cls([101, 1, 2, 3, 4, 5, 102], cls_id=101, sep_id=102, every=2)
    assert ids == [101, 1, 2, 101, 3, 4, 101, 5, 102] and flags == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    ids, flags = insert_cls([101, 1, 2, 3, 4, 5, 102], 101, 102, every=2, max_length=7)
    assert ids == [101, 1, 2, 101, 3, 4, 102] and sum(flags) == 2  # cut to fit, SEP kept
    assert insert_cls([101, 102], 101, 102, every=2) == ([101, 102], [1, 0])
    with pytest.raises(ValueError, match="start with"):
        insert_cls([5, 1, 102], 101, 102, every=2)
    with pytest.raises(ValueError, match=">= 1"):
        insert_cls([101, 1, 102], 101, 102, every=0)
    encoder = tiny_encoder(hidden_size=16, num_layers=1, m3_heads=True)
    with pytest.raises(ValueError, match="dense head only"):
        encoder.encode(["a b"], sparse=True, mcls=4)
