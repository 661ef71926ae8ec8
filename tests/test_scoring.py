"""Vectorized scores against slow per-pair definitions; FAISS against brute force; quantization."""

import numpy as np
import pytest

from raylib.quantization import Int8Calibration, quantize_binary, quantized_search, unpack_binary
from raylib.scoring import dense_scores, hybrid_scores, lexical_scores, multivector_scores
from raylib.search import exact_search

rng = np.random.default_rng(0)


def _unit(n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_lexical_equals_definition():
    q = [{1: 0.5, 7: 1.0}, {3: 0.2}, {}]
    d = [{1: 2.0, 3: 1.0}, {7: 0.5, 9: 9.0}]
    expected = np.array([[sum(a[t] * b[t] for t in a if t in b) for b in d] for a in q])
    np.testing.assert_allclose(lexical_scores(q, d), expected, atol=1e-6)


def test_multivector_equals_definition():
    q = [_unit(rng.integers(1, 6), 8) for _ in range(4)]
    d = [_unit(rng.integers(1, 9), 8) for _ in range(7)]
    expected = np.array([[(a @ b.T).max(1).mean() for b in d] for a in q])
    np.testing.assert_allclose(multivector_scores(q, d, doc_chunk=3), expected, atol=1e-5)


def test_hybrid_is_weighted_mean():
    a, b, c = rng.normal(size=(3, 2, 5))
    np.testing.assert_allclose(hybrid_scores(a, b, c, (0.4, 0.2, 0.4)), (0.4 * a + 0.2 * b + 0.4 * c) / 1.0, atol=1e-6)
    np.testing.assert_allclose(hybrid_scores(a, None, c, (1, 5, 1)), (a + c) / 2, atol=1e-6)
    with pytest.raises(ValueError):
        hybrid_scores(None, None, None)


def test_faiss_matches_brute_force():
    q, d = _unit(30, 16), _unit(500, 16)
    scores, ids = exact_search(q, d, 10, query_chunk=7)
    brute = dense_scores(q, d)
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, 1), atol=1e-5)


def test_int8_and_binary_quantization():
    x = _unit(200, 32)
    cal = Int8Calibration.fit(x)
    codes = cal.quantize(x)
    assert codes.dtype == np.int8 and codes.min() >= -128 and codes.max() <= 127
    assert np.abs(cal.dequantize(codes) - x).max() <= cal.step.max() / 2 + 1e-6
    bits = quantize_binary(x)
    assert bits.shape == (200, 4) and bits.dtype == np.uint8
    np.testing.assert_array_equal(unpack_binary(bits, 32) > 0, x > 0)


# chance overlap is 0.01
@pytest.mark.parametrize("method,min_overlap", [("int8", 0.9), ("binary", 0.2)])
def test_quantized_search_with_rescoring_recovers_float_ranking(method, min_overlap):
    q, d = _unit(20, 64), _unit(1000, 64)
    _, ref = exact_search(q, d, 10)
    scores, ids = quantized_search(q, d, 10, method, rescore_multiplier=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, ids)])
    assert overlap >= min_overlap
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted best first
    with pytest.raises(ValueError):
        quantized_search(q, d, 10, "int4")
