"""Finetuning losses against slow, direct computations of the papers' equations: hard-negative
InfoNCE, teacher KL, M3 self-knowledge distillation (M3 §3.2-3.3), and M3 length grouping."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raylib.batching import LengthBucket, assign_buckets, length_grouped_schedule
from raylib.losses.distill import teacher_kl
from raylib.losses.hard_negative import hard_negative_infonce, own_group_scores
from raylib.losses.m3 import M3Weights, m3_loss

B, G, H, VOCAB = 3, 3, 8, 12  # queries, group size (1 positive + 2 negatives), dims, token ids


def _side(n: int, max_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random Encoder-like outputs of n texts of random lengths (CLS first, padding after)."""
    lengths = torch.randint(3, max_len + 1, (n,), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()  # [n, L]
    ids = torch.randint(2, VOCAB, (n, max_len), generator=gen) * mask  # repeats within a text; pad id 0
    ids[:, 0] = 1  # CLS
    sparse = torch.rand(n, max_len, generator=gen) * mask
    sparse[:, 0] = 0.0  # special tokens get no weight (as Encoder.forward does)
    sparse[torch.rand(n, max_len, generator=gen) < 0.2] = 0.0  # ReLU zeros
    multi = F.normalize(torch.randn(n, max_len - 1, H, generator=gen), dim=-1) * mask[:, 1:, None]
    dense = F.normalize(torch.randn(n, H, generator=gen), dim=-1)
    return {"dense": dense.requires_grad_(), "sparse": sparse.requires_grad_(),
            "multivector": multi.requires_grad_(), "mask": mask, "input_ids": ids}


def _slow_scores(q: dict, d: dict, i: int, j: int) -> dict[str, torch.Tensor]:
    """M3 §3.2 for one query i and one document j, written out with Python loops."""
    s_dense = sum(q["dense"][i, k] * d["dense"][j, k] for k in range(H))
    w_q, w_p = {}, {}
    for weights, side, idx in ((w_q, q, i), (w_p, d, j)):
        for t in range(side["mask"].shape[1]):
            if side["mask"][idx, t] and side["sparse"][idx, t] > 0:  # "retain its max weight"
                tok = int(side["input_ids"][idx, t])
                weights[tok] = torch.maximum(weights[tok], side["sparse"][idx, t]) if tok in weights \
                    else side["sparse"][idx, t]
    s_lex = sum((w_q[t] * w_p[t] for t in set(w_q) & set(w_p)), torch.tensor(0.0))
    n_q = int(q["mask"][i].sum()) - 1  # tokens after CLS
    m_p = int(d["mask"][j].sum()) - 1
    total = torch.tensor(0.0)
    for a in range(n_q):
        total = total + max((q["multivector"][i, a] @ d["multivector"][j, b] for b in range(m_p)),
                            key=lambda x: float(x.detach()))
    return {"dense": s_dense, "lex": s_lex, "mul": total / n_q}


def _slow_m3_loss(q, d, in_batch, tau, w: M3Weights, offset=0):
    """Eqs. 1-4 of M3 §3.3 with FlagEmbedding's weights, one query at a time."""
    lam = {"dense": w.lambda_dense, "lex": w.lambda_lex, "mul": w.lambda_mul}
    weight = {"dense": w.w_dense, "lex": w.w_lex, "mul": w.w_mul}
    n_docs = d["dense"].shape[0]
    per_query = []
    for i in range(q["dense"].shape[0]):
        cands = range(n_docs) if in_batch else range((offset + i) * G, (offset + i + 1) * G)
        pos = (offset + i) * G
        s = {k: [] for k in ("dense", "lex", "mul", "inter")}
        for j in cands:
            one = _slow_scores(q, d, i, j)
            for k in one:
                s[k].append(one[k] / tau)
            s["inter"].append(sum(weight[k] * one[k] / tau for k in weight))  # eq. 2
        cols = list(cands)

        def log_p(k, c):
            return s[k][cols.index(c)] - torch.log(sum(torch.exp(x) for x in s[k]))

        nce = {k: -log_p(k, pos) for k in s}  # eq. 1
        loss = (sum(lam[k] * nce[k] for k in lam) + nce["inter"]) / 4
        if w.self_distill:
            p_inter = [float(torch.exp(log_p("inter", c)).detach()) for c in cols]  # teacher: no gradient
            kd = {k: -sum(p_inter[n] * log_p(k, c) for n, c in enumerate(cols)) for k in lam}  # eq. 3
            loss = (loss + sum(lam[k] * kd[k] for k in lam) / 3) / 2  # eq. 4 and L + L'
        per_query.append(loss)
    return sum(per_query) / len(per_query)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("weights", [M3Weights(), M3Weights(w_lex=1.0, lambda_lex=1.0),
                                     M3Weights(self_distill=False)])
def test_m3_self_distillation_equals_the_papers_equations(in_batch, weights):
    gen = torch.Generator().manual_seed(0)
    q, d = _side(B, 6, gen), _side(B * G, 9, gen)
    tau = 0.5
    fast, parts, _ = m3_loss(q, d, G, temperature=tau, in_batch=in_batch, weights=weights)
    slow = _slow_m3_loss(q, d, in_batch, tau, weights)
    assert abs(float(fast) - float(slow)) < 1e-5, (float(fast), float(slow))
    leaves = [q["dense"], q["sparse"], q["multivector"], d["dense"], d["sparse"], d["multivector"]]
    for leaf, a, b in zip(leaves, _grads(fast, leaves), _grads(slow, leaves)):
        if leaf is q["sparse"] or leaf is d["sparse"]:
            # a zero weight ties with the empty slot in the amax; upstream (ReLU, special-token
            # mask) its gradient is zero anyway, so compare where weights are positive
            a, b = a[leaf > 0], b[leaf > 0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert set(parts) >= {"loss_dense", "loss_lex", "loss_mul", "loss_inter"}


def test_m3_cross_worker_split_equals_one_big_batch():
    """Two workers, each with its queries and everyone's documents (offset = rank * b): the mean of
    their losses is the single-process loss over all queries."""
    gen = torch.Generator().manual_seed(1)
    q, d = _side(4, 5, gen), _side(4 * G, 7, gen)
    full, _, _ = m3_loss(q, d, G, temperature=0.1, in_batch=True)
    halves = []
    for rank in range(2):
        q_r = {k: v[rank * 2:(rank + 1) * 2] for k, v in q.items()}
        halves.append(m3_loss(q_r, d, G, temperature=0.1, in_batch=True, offset=rank * 2)[0])
    assert abs(float(full) - float(sum(halves) / 2)) < 1e-6
    own, _, _ = m3_loss({k: v[2:] for k, v in q.items()}, d, G, temperature=0.1, offset=2)
    ref = _slow_m3_loss({k: v[2:] for k, v in q.items()}, d, False, 0.1, M3Weights(), offset=2)
    assert abs(float(own) - float(ref)) < 1e-5


def test_hard_negative_infonce_against_direct_formula():
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(B, H, generator=gen), dim=-1)
    d = F.normalize(torch.randn(2 * B * G, H, generator=gen), dim=-1)  # two workers' groups
    tau = 0.05
    for in_batch in (False, True):
        loss, scores = hard_negative_infonce(q, d, G, tau, in_batch=in_batch, offset=B)
        ref = 0.0
        for i in range(B):
            own = range((B + i) * G, (B + i + 1) * G)
            cands = range(2 * B * G) if in_batch else own
            logits = [float(q[i] @ d[j]) / tau for j in cands]
            ref += -(float(q[i] @ d[own[0]]) / tau - math.log(sum(math.exp(x) for x in logits)))
        assert abs(float(loss) - ref / B) < 1e-4
        if in_batch:
            assert torch.allclose(own_group_scores(scores, G, B),
                                  hard_negative_infonce(q, d, G, tau, offset=B)[1])
    with pytest.raises(ValueError, match="whole groups"):
        hard_negative_infonce(q, d[:-1], G)


def test_teacher_kl_against_direct_formula_and_mask():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(B, G, generator=gen), torch.randn(B, G, generator=gen)
    got = teacher_kl(s, t, temperature=0.5, teacher_temperature=0.25)
    ref = 0.0
    for i in range(B):
        p = torch.softmax(t[i] / 0.25, 0)
        ref += float((p * (p.log() - torch.log_softmax(s[i] / 0.5, 0))).sum())
    assert abs(float(got) - ref / B) < 1e-6
    assert float(teacher_kl(t, t, 0.3, 0.3)) < 1e-6  # identical distributions
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[0, 2] = False  # a missing candidate: same as dropping that column
    masked = teacher_kl(s, t, 1.0, 1.0, mask=mask)
    rest = (teacher_kl(s[1:], t[1:], 1.0, 1.0) * (B - 1) + teacher_kl(s[:1, :2], t[:1, :2], 1.0, 1.0)) / B
    assert abs(float(masked) - float(rest)) < 1e-6
    with pytest.raises(ValueError, match="shape"):
        teacher_kl(s, t[:, :2])


def test_length_grouping_same_bucket_on_every_rank():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, size=203)
    buckets = [LengthBucket(100, 16), LengthBucket(300, 8), LengthBucket(512, 4)]
    world = 2
    sched = length_grouped_schedule(lengths, buckets, world_size=world, seed=7, epoch=0)
    which = assign_buckets(lengths, buckets)
    seen = []
    for step in sched.steps:
        assert len(step.ranks) == world and len({len(r) for r in step.ranks}) == 1
        assert step.size <= buckets[step.bucket].batch_size
        for r in step.ranks:
            assert all(which[i] == step.bucket for i in r)  # one bucket per step, on every rank
            seen.extend(r)
    # every example is used once, or listed as dropped (fewer than world_size left in a bucket)
    assert sorted(seen + sched.dropped) == list(range(len(lengths)))
    assert len(sched.dropped) <= len(buckets) * (world - 1)
    assert which[np.argmax(lengths)] == 2  # longer than every bound: the last bucket
    again = length_grouped_schedule(lengths, buckets, world_size=world, seed=7, epoch=0)
    assert [s.ranks for s in again.steps] == [s.ranks for s in sched.steps]  # pure: same on all ranks
    other = length_grouped_schedule(lengths, buckets, world_size=world, seed=7, epoch=1)
    assert [s.ranks for s in other.steps] != [s.ranks for s in sched.steps]
    dropped = length_grouped_schedule(lengths, buckets, world_size=world, drop_last=True)
    assert all(s.size == buckets[s.bucket].batch_size for s in dropped.steps)
    with pytest.raises(ValueError, match="split"):
        length_grouped_schedule(lengths, [LengthBucket(100, 3)], world_size=2)


def test_m3_warmup_switches_self_distillation_on_at_the_step_boundary():
    """M3 App. B.1: steps 0..warmup_steps-1 train L alone (per-head + s_inter InfoNCE), from
    warmup_steps on (L + L') / 2; step None means after the warm-up."""
    gen = torch.Generator().manual_seed(4)
    q, d = _side(B, 6, gen), _side(B * G, 9, gen)
    warm = M3Weights(warmup_steps=3)
    plain = m3_loss(q, d, G, 0.5, weights=M3Weights(self_distill=False))[0]
    unified = m3_loss(q, d, G, 0.5, weights=M3Weights())[0]
    assert abs(float(plain) - float(unified)) > 1e-4  # the two phases differ on this batch
    for step in range(6):
        loss, parts, _ = m3_loss(q, d, G, 0.5, weights=warm, step=step)
        want = plain if step < 3 else unified
        assert float(loss) == pytest.approx(float(want), abs=1e-7), step
        assert ("self_distill_dense" in parts) == (step >= 3)
    assert float(m3_loss(q, d, G, 0.5, weights=warm)[0]) == pytest.approx(float(unified), abs=1e-7)
    assert not M3Weights(self_distill=False, warmup_steps=2).self_distill_at(5)
    with pytest.raises(ValueError, match="warmup_steps"):
        M3Weights(warmup_steps=-1)
