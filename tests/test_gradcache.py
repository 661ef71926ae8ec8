"""Gradient caching equals one unchunked batch (loss and every parameter gradient), with Matryoshka,
with dict-of-tensor reps (dense + multi-vector + sparse), and composed with the cross-worker gather
(2 gloo processes x B/2 == 1 process x B)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from raylib.gradcache import RandContext, forward_backward, pad_features
from raylib.objectives.contrastive import ContrastiveObjective
from raylib.tiny import tiny_encoder
from raylib.ports import free_port

ROWS = {"query": ["cat river", "dog house", "king war music", "red tree", "blue car", "water cell",
                  "film book", "gene protein"],
        "document": ["the cat swam in the river", "a dog in a house", "war music of the king",
                     "the tree was red", "blue car on the road", "water in a cell", "a book about film",
                     "gene and protein results"]}


def _run(encoder, objective, rows, chunk):
    encoder.zero_grad(set_to_none=True)
    features = objective.features(encoder, rows)
    loss, metrics = forward_backward(lambda s, f: objective.embed(encoder, s, f), features,
                                     lambda reps: objective.loss(reps, features, rows), chunk)
    grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return loss, metrics, grads


def _assert_same(a, b, atol=1e-5):
    loss_a, metrics_a, grads_a = a
    loss_b, metrics_b, grads_b = b
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        assert abs(metrics_a[k] - metrics_b[k]) < atol, k
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=atol), (n, (grads_a[n] - grads_b[n]).abs().max())


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_grad_cache_equals_full_batch_with_matryoshka(chunk):
    torch.manual_seed(0)
    encoder = tiny_encoder(hidden_size=32, seed=0).train()
    objective = ContrastiveObjective(temperature=0.05, symmetric=True, matryoshka_dims=[8, 16],
                                     matryoshka_weights=[0.5, 1.0])
    full = _run(encoder, objective, ROWS, None)
    cached = _run(encoder, objective, ROWS, chunk)
    assert set(full[1]) == {"loss", "loss@32", "loss@16", "loss@8"}
    _assert_same(full, cached)


def test_activation_checkpointing_keeps_loss_and_gradients():
    """model.activation_checkpointing (the loop's switch) recomputes activations; same numbers."""
    objective = ContrastiveObjective(temperature=0.05, matryoshka_dims=[16])
    plain = _run(tiny_encoder(hidden_size=32, seed=0).train(), objective, ROWS, 4)
    encoder = tiny_encoder(hidden_size=32, seed=0).train()
    encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert encoder.backbone.is_gradient_checkpointing
    _assert_same(plain, _run(encoder, objective, ROWS, 4))


class ThreeHeads(ContrastiveObjective):
    """A toy objective over dense, multi-vector ([b, L-1, H']) and sparse ([b, L]) reps."""

    def embed(self, model, side, features):
        out = model(features["input_ids"], features["attention_mask"], dense=True, sparse=True,
                    multivector=True)
        return {k: out[k] for k in ("dense", "multivector", "sparse", "mask")}

    def loss(self, reps, features, rows):
        q, d = reps["query"], reps["document"]
        dense = q["dense"] @ d["dense"].T
        colbert = torch.einsum("qih,djh->qdij", q["multivector"], d["multivector"]).amax(-1).mean(-1)
        sparse = q["sparse"].sum(-1, keepdim=True) * d["sparse"].mean(-1)[None]
        scores = dense + colbert + 0.1 * sparse
        loss = F.cross_entropy(scores / 0.05, torch.arange(len(scores)))
        return loss, {"loss": float(loss.detach())}


def test_grad_cache_generic_over_dict_reps_with_multivector():
    encoder = tiny_encoder(hidden_size=32, m3_heads=True, seed=1).train()
    objective = ThreeHeads()
    full = _run(encoder, objective, ROWS, None)
    cached = _run(encoder, objective, ROWS, 3)
    assert any(n.startswith("colbert_linear") for n in cached[2])
    assert any(n.startswith("sparse_linear") for n in cached[2])
    _assert_same(full, cached)


def test_rand_context_replays_dropout():
    torch.manual_seed(0)
    layer = torch.nn.Dropout(0.5)
    x = torch.ones(100)
    ctx = RandContext()
    first = layer(x)
    torch.rand(10)  # move the RNG on
    with ctx:
        again = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(layer(x), first)


def test_pad_features():
    f = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]])}
    out = pad_features(f, 4, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 0, 0]] and out["attention_mask"].tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError):
        pad_features(out, 3, pad_id=0)


# ----------------------------------------------------------------------------- 2 workers x B/2
def _objective():
    return ContrastiveObjective(temperature=0.05, symmetric=True, gather_queries=True,
                                matryoshka_dims=[16], matryoshka_weights=[0.5])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    encoder = tiny_encoder(hidden_size=32, seed=0).train()
    model = DDP(encoder, find_unused_parameters=True)
    objective = _objective()
    half = len(ROWS["query"]) // world
    rows = {k: v[rank * half:(rank + 1) * half] for k, v in ROWS.items()}
    results = {}
    for chunk in (None, 2):
        encoder.zero_grad(set_to_none=True)
        features = objective.features(encoder, rows)
        loss, metrics = forward_backward(lambda s, f: objective.embed(model, s, f), features,
                                         lambda reps: objective.loss(reps, features, rows), chunk,
                                         no_sync=model.no_sync)
        loss_sum = loss.clone()
        dist.all_reduce(loss_sum)
        results[str(chunk)] = {"loss": loss_sum / world,
                               "grads": {n: p.grad.clone() for n, p in encoder.named_parameters()
                                         if p.grad is not None}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_workers_with_gather_equal_one_worker(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    encoder = tiny_encoder(hidden_size=32, seed=0).train()
    single = _run(encoder, _objective(), ROWS, None)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for chunk, r in results.items():
            assert torch.allclose(r["loss"], single[0], atol=1e-5), (chunk, r["loss"], single[0])
            assert r["grads"].keys() == single[2].keys()
            for n, g in r["grads"].items():  # DDP averaged: every rank holds the full-batch gradient
                assert torch.allclose(g, single[2][n], atol=1e-5), (chunk, n, (g - single[2][n]).abs().max())
