"""InfoNCE, Matryoshka and the gather: pure functions checked against slow obvious references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raylib.losses.gather import all_gather_offset, all_gather_with_grad, world
from raylib.losses.infonce import info_nce
from raylib.losses.matryoshka import matryoshka_loss


def _reference_info_nce(q, d, pos, tau):
    total = 0.0
    for i in range(q.shape[0]):
        scores = [float(q[i] @ d[j]) / tau for j in range(d.shape[0])]
        m = max(scores)
        log_z = m + math.log(sum(math.exp(s - m) for s in scores))
        total += log_z - scores[int(pos[i])]
    return total / q.shape[0]


def test_info_nce_matches_reference():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    d = F.normalize(torch.randn(9, 8, generator=g, dtype=torch.float64), dim=-1)
    pos = torch.tensor([0, 3, 2, 8, 4])
    for tau in (0.02, 0.5):
        assert float(info_nce(q, d, pos, tau)) == pytest.approx(_reference_info_nce(q, d, pos, tau), rel=1e-9)


def test_info_nce_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]), 0.0)


def test_matryoshka_is_weighted_sum_of_renormalized_prefixes():
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    pos = torch.arange(4)

    def loss_fn(a, b):
        return info_nce(a, b, pos, 0.05)

    total, per_dim = matryoshka_loss(loss_fn, [q, d], dims=[4, 8], weights=[0.5, 2.0], full_weight=1.5)
    expect = {16: loss_fn(F.normalize(q, dim=-1), F.normalize(d, dim=-1))}
    for k in (4, 8):
        expect[k] = loss_fn(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1))
    assert set(per_dim) == {4, 8, 16}
    for k in expect:
        assert torch.allclose(per_dim[k], expect[k])
    assert torch.allclose(total, 1.5 * expect[16] + 0.5 * expect[4] + 2.0 * expect[8])
    # no dims: just the full loss
    plain, only = matryoshka_loss(loss_fn, [q, d])
    assert torch.allclose(plain, expect[16]) and list(only) == [16]


@pytest.mark.parametrize("dims,weights", [([16], None), ([0], None), ([4, 8], [1.0])])
def test_matryoshka_rejects_bad_dims(dims, weights):
    with pytest.raises(ValueError):
        matryoshka_loss(lambda a, b: (a * b).sum(), [torch.ones(2, 16), torch.ones(2, 16)], dims, weights)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert world() == (0, 1)
    assert all_gather_with_grad(x) is x
    assert all_gather_offset(3) == 0
