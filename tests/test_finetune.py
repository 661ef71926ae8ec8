"""Finetuning: the objective on the shared loop's training step, BGE-M3 heads on a synthetic task
(each head beats chance, the hybrid is at least the best head), FlagEmbedding loads what we save,
and the Ray Train job with cross-worker negatives for all three heads equals one big batch."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylib.losses.m3 import M3Weights
from raylib.metrics import evaluate
from raylib.model import Encoder
from raylib.objectives.finetune import FinetuneObjective, select_groups
from raylib.training import build_optimizer, training_step
from raylib.train_config import TrainSection
from raylib.schedule import wsd_scheduler
from raylib.scoring import hybrid_scores, score_encoded
from raylib.tiny import _WORDS, tiny_encoder

WORDS = sorted(set(_WORDS))[:80]  # a small vocabulary: every word is seen often in 200 steps


def _synthetic(n: int, seed: int, num_negatives: int = 3) -> dict[str, list]:
    """Queries of 2 words; the positive holds both among fillers; hard negatives hold one of them."""
    rng = random.Random(seed)
    rows = {k: [] for k in ("id", "query", "positive", "negatives", "positive_score",
                            "negative_scores", "source", "language")}
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        filler = lambda k: rng.sample([w for w in WORDS if w not in (a, b)], k)  # noqa: E731
        pos = filler(4) + [a, b]
        rng.shuffle(pos)
        negs = []
        for j in range(num_negatives):
            neg = filler(5) + [(a, b)[j % 2]]
            rng.shuffle(neg)
            negs.append(" ".join(neg))
        rows["id"].append(f"q{seed}-{i}")
        rows["query"].append(f"{a} {b}")
        rows["positive"].append(" ".join(pos))
        rows["negatives"].append(negs)
        rows["positive_score"].append(0.9)
        rows["negative_scores"].append([0.5 - 0.1 * j for j in range(num_negatives)])
        rows["source"].append("synthetic")
        rows["language"].append("en")
    return rows


def test_select_groups_fills_short_rows_and_rejects_bad_input():
    rows = _synthetic(3, 0)
    rows["negatives"][1] = rows["negatives"][1][:1]  # one mined negative instead of 3
    g = select_groups(rows, 3)
    assert len(g.documents) == 3 * 4 and g.filled == 2
    assert g.documents[4] == rows["positive"][1] and g.documents[6:8] == [rows["positive"][2], rows["positive"][0]]
    assert g.mined[1].tolist() == [True, True, False, False] and torch.isnan(g.teacher[1, 2:]).all()
    assert g.teacher[0].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="missing"):
        select_groups({"query": ["a"], "positive": ["b"]}, 3)
    with pytest.raises(ValueError, match="too few"):
        select_groups({k: v[:1] for k, v in rows.items()} | {"negatives": [[]]}, 3)
    with pytest.raises(ValueError, match="negatives must be"):
        FinetuneObjective(negatives="everything")


def _train(encoder, objective, rows, steps, batch, lr, seed=0):
    t = TrainSection(lr=lr, warmup=0, decay=0.3, max_grad_norm=1.0)
    opt = build_optimizer(encoder, t)
    sched = wsd_scheduler(opt, steps, t.warmup, t.decay)
    encoder.train()
    order = random.Random(seed)
    n = len(rows["query"])
    history = []
    for step in range(steps):
        idx = order.sample(range(n), batch)
        metrics, _ = training_step(encoder, encoder, objective, {k: [v[i] for i in idx] for k, v in rows.items()},
                                   opt, sched, t, torch.device("cpu"), step=step)
        history.append(metrics)
    encoder.eval()
    return history


def _retrieval(encoder, rows) -> dict[str, float]:
    """nDCG@10 of each head and of s_inter's hybrid on held-out queries; corpus = all their docs."""
    docs = list(dict.fromkeys(rows["positive"] + [d for negs in rows["negatives"] for d in negs]))
    qrels = {f"q{i}": {str(docs.index(p)): 1} for i, p in enumerate(rows["positive"])}
    q = encoder.encode(rows["query"], "query", sparse=True, multivector=True)
    d = encoder.encode(docs, "document", sparse=True, multivector=True)
    w = M3Weights()
    scores = score_encoded(q, d, weights=(w.w_dense, w.w_lex, w.w_mul))
    out = {}
    for mode, s in scores.items():
        run = {f"q{i}": {str(j): float(s[i, j]) for j in np.argsort(-s[i])[:10]} for i in range(len(s))}
        out[mode] = evaluate(qrels, run, ["ndcg@10"])["ndcg@10"]
    out["n_docs"] = len(docs)
    return out


@pytest.fixture(scope="module")
def m3_trained(tmp_path_factory):
    """A tiny XLM-R (BGE-M3's architecture) with both extra heads, finetuned with M3 self-distillation.
    Mean pooling for the dense head: a random tiny model's CLS state is nearly the same for every
    text (BGE-M3 starts from a pretrained model), so a CLS head learns too slowly for a unit test."""
    torch.manual_seed(0)
    encoder = tiny_encoder(arch="xlm-roberta", hidden_size=32, num_layers=1, m3_heads=True, seed=0,
                           pooling="mean")
    objective = FinetuneObjective(mode="m3", num_negatives=3, temperature=0.05, query_max_length=8,
                                  document_max_length=12, negatives="in_batch", matryoshka_dims=[16],
                                  m3=M3Weights(warmup_steps=30))  # --recipe m3: warm-up, then self-KD
    before = _retrieval(encoder, _synthetic(60, 99))
    history = _train(encoder, objective, _synthetic(400, 1), steps=200, batch=16, lr=2e-3)
    after = _retrieval(encoder, _synthetic(60, 99))
    path = encoder.save_pretrained(tmp_path_factory.mktemp("m3") / "model")
    return encoder, path, before, after, history


def test_m3_heads_learn_and_hybrid_is_at_least_the_best_head(m3_trained):
    _, _, before, after, history = m3_trained
    assert {"loss_dense", "loss_lex", "loss_mul", "loss_inter", "loss_dense@16"} <= set(history[0])
    assert "self_distill_dense" in history[30] and "self_distill_dense" not in history[29]
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.7 * first, (first, last)
    # chance: one relevant document at a random rank among n_docs -> expected nDCG@10 ~ 10/n * 0.45
    chance = 10 / after["n_docs"] * 0.5
    for head in ("dense", "sparse", "multivector"):
        assert after[head] > 4 * chance, (head, after, chance)
        assert after[head] > before[head], (head, before, after)
    best = max(after["dense"], after["sparse"], after["multivector"])
    assert after["hybrid"] >= best - 1e-9, after


def test_flagembedding_loads_our_finetuned_m3_model(m3_trained):
    from FlagEmbedding import BGEM3FlagModel

    from peers import require_peer
    from raylib.scoring import compute_score

    require_peer("flagembedding")

    _, path, _, _, _ = m3_trained
    ours = Encoder.from_pretrained(path, device="cpu")
    assert ours.settings.pooling == "mean"
    texts = _synthetic(4, 5)["positive"] + ["cat dog", "river"]
    ref_model = BGEM3FlagModel(str(path), use_fp16=False, devices="cpu", pooling_method="mean")
    ref = ref_model.encode(texts, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    got = ours.encode(texts, batch_size=3, sparse=True, multivector=True)
    np.testing.assert_allclose(got["dense"], ref["dense_vecs"], atol=1e-5)
    for mine, theirs in zip(got["sparse"], ref["lexical_weights"]):
        assert set(mine) == {int(k) for k in theirs}
        assert all(abs(mine[int(k)] - float(w)) < 1e-5 for k, w in theirs.items())
    for mine, theirs in zip(got["multivector"], ref["colbert_vecs"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    pairs = [(texts[4], texts[0]), (texts[5], texts[1]), (texts[0], texts[0])]
    weights = [0.4, 0.2, 0.4]
    theirs = ref_model.compute_score(pairs, batch_size=1, weights_for_different_modes=weights)
    mine = compute_score(ours, pairs, weights)
    for key, ref_key in [("dense", "dense"), ("sparse", "sparse"), ("multivector", "colbert"),
                         ("hybrid", "colbert+sparse+dense")]:
        np.testing.assert_allclose(mine[key], theirs[ref_key], atol=1e-5, err_msg=key)


def test_m3_warmup_phase_in_the_training_step():
    """The loop's step reaches the objective (begin_step): no self-distillation for the first
    m3.warmup_steps optimizer steps, unified self-KD after; the first steps' loss is L alone."""
    encoder = tiny_encoder(hidden_size=16, num_layers=1, m3_heads=True, seed=2)
    objective = FinetuneObjective(mode="m3", num_negatives=2, temperature=0.1, query_max_length=8,
                                  document_max_length=12, negatives="hard",
                                  m3=M3Weights(warmup_steps=2))
    rows = _synthetic(4, 3, num_negatives=2)
    t = TrainSection(lr=0.0, warmup=0, decay=0)
    opt = build_optimizer(encoder, t)
    sched = wsd_scheduler(opt, 4, 0, 0)
    flags = [training_step(encoder, encoder, objective, rows, opt, sched, t, torch.device("cpu"),
                           step=s)[0] for s in range(4)]
    assert [m["self_distill"] for m in flags] == [0.0, 0.0, 1.0, 1.0]
    parts = ("loss_dense", "loss_lex", "loss_mul", "loss_inter")
    lam = {"loss_dense": 1.0, "loss_lex": 0.1, "loss_mul": 1.0, "loss_inter": 1.0}
    for m in flags[:2]:  # lr 0: the same model every step; warm-up loss = L of M3 eq. 1
        assert m["loss"] == pytest.approx(sum(lam[k] * m[k] for k in parts) / 4, rel=1e-5)
    assert flags[2]["loss"] != pytest.approx(flags[1]["loss"], rel=1e-4)


def test_dense_finetuning_with_teacher_distillation_learns():
    encoder = tiny_encoder(hidden_size=32, num_layers=2, seed=1)
    objective = FinetuneObjective(mode="dense", num_negatives=3, temperature=0.05, query_max_length=16,
                                  document_max_length=24, negatives="hard", distill_weight=0.5,
                                  teacher_temperature=0.1)
    history = _train(encoder, objective, _synthetic(200, 2), steps=40, batch=16, lr=1e-3)
    assert "teacher_kl_dense" in history[0] and "loss_dense@32" in history[0]
    assert np.mean([h["loss"] for h in history[-5:]]) < np.mean([h["loss"] for h in history[:5]])


def _write_mined(path, rows):
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.slow
def test_finetune_job_two_workers_cross_worker_m3_equals_one_batch(tmp_path, ray_session):
    """jobs/finetune.py on 2 Ray Train workers, M3 heads, cross-worker negatives for all heads: the
    first step's loss (mean over ranks) equals the single-process loss of the same 8 rows."""
    from pathlib import Path

    from raylib.config import load_config
    from raylib.jobs.finetune import FinetuneJobConfig, main

    rows = _synthetic(24, 3)
    data = _write_mined(tmp_path / "mined.parquet", rows)
    overrides = [f"data.paths=[{data}]", f"checkpoint.storage_path={tmp_path / 'runs'}",
                 "train.max_steps=3", "checkpoint.every_steps=3", "train.log_consumed=true",
                 "model.tiny={hidden_size: 32, num_layers: 2, m3_heads: true, max_length: 64, arch: xlm-roberta}"]
    summary = main(["--config", "jobs/configs/finetune/debug.yaml", *sum((["--set", o] for o in overrides), [])])
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "colbert_linear.pt").exists() and (ckpt / "sparse_linear.pt").exists()
    trained = Encoder.from_pretrained(ckpt, device="cpu")
    assert trained.has_sparse and trained.has_multivector
    run = Path(summary["output"])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and {"loss_lex", "loss_mul", "self_distill_mul", "teacher_kl_lex"} <= set(first)
    ids = []
    for rank in range(2):
        step0 = [json.loads(line) for line in (run / f"consumed_rank{rank}.jsonl").read_text().splitlines()]
        ids += next(r["ids"] for r in step0 if r["step"] == 0)
    # the same rows, one process, the same initial weights: in-batch over all 8 groups
    cfg = load_config(FinetuneJobConfig, "jobs/configs/finetune/debug.yaml", overrides)
    from raylib.training import build_encoder

    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model, cfg.train.seed)
    encoder.train()
    objective = cfg.objective
    where = {i: k for k, i in enumerate(rows["id"])}
    batch = {c: [rows[c][where[i]] for i in ids] for c in rows}
    feats = objective.features(encoder, batch)
    reps = {s: objective.embed(encoder, s, f) for s, f in feats.items()}
    objective.negatives = "in_batch"
    loss, _ = objective.loss(reps, feats, batch)
    assert abs(float(loss) - first["loss"]) < 1e-4, (float(loss), first["loss"])


@pytest.mark.slow
def test_length_grouping_tags_sources_by_bucket(tmp_path, ray_session):
    """M3 §3.4 length grouping goes through the prepare stage (a Ray Data job): rows land in
    per-bucket sources of the manifest, token ids and all, nothing lost, nothing on the driver's disk."""
    from raylib.config import load_config
    from raylib.jobs.finetune import FinetuneJobConfig, apply_length_grouping
    from raylib.train_data import PreparedData, make_plan

    rows = _synthetic(6, 4)
    rows["positive"][2] = " ".join(["cat"] * 40)  # one long group
    data = _write_mined(tmp_path / "mined.parquet", rows)
    cfg = load_config(FinetuneJobConfig, "jobs/configs/finetune/debug.yaml",
                      [f"data.paths=[{data}]", f"checkpoint.storage_path={tmp_path}",
                       "length_grouping.bounds=[16, 64]", "length_grouping.batch_sizes=[4, 2]"])
    info = apply_length_grouping(cfg)
    assert cfg.data.source_batch_sizes == {"#len<=16": 4, "#len<=64": 2} == info["batch_sizes"]
    assert info["rows_per_source_bucket"] == {"synthetic/en#len<=16": 5, "synthetic/en#len<=64": 1}
    assert cfg.data.prepared == info["path"] == str(tmp_path / "debug" / "prepared")
    prepared = PreparedData.open(cfg.data.prepared)
    long = prepared.read("synthetic/en#len<=64", np.arange(1))
    assert long.column("id").to_pylist() == [rows["id"][2]] and len(long.column("positive_ids")[0]) == 42
    short = prepared.read("synthetic/en#len<=16", np.arange(5))
    assert sorted(short.column("id").to_pylist()) == sorted(i for k, i in enumerate(rows["id"]) if k != 2)
    plan = make_plan(prepared.source_rows, 2, 2, 0, 1, batch_sizes=cfg.data.source_batch_sizes)
    assert plan.sizes == {"synthetic/en#len<=16": 4, "synthetic/en#len<=64": 2}


def test_m3_mode_gives_a_dense_checkpoint_fresh_heads(tiny_dir, tmp_path):
    from raylib.config import load_config
    from raylib.jobs.finetune import FinetuneJobConfig
    from raylib.training import build_encoder

    dense_dir = Encoder.from_pretrained(tiny_dir)
    dense_dir.sparse_linear = dense_dir.colbert_linear = None  # a dense model, as minilm is
    path = dense_dir.save_pretrained(tmp_path / "dense")
    assert not Encoder.from_pretrained(path).has_multivector
    dense_cfg = load_config(FinetuneJobConfig, None, [f"model.name_or_path={path}", "objective.mode=dense"])
    assert not build_encoder(dense_cfg.model).has_sparse
    cfg = load_config(FinetuneJobConfig, None, [f"model.name_or_path={path}", "objective.mode=m3"])
    encoder = build_encoder(cfg.model, seed=0)
    assert encoder.has_sparse and encoder.has_multivector
    out = encoder.encode(["a query"], kind="query", dense=True, sparse=True, multivector=True)
    assert len(out["sparse"]) == 1 and out["multivector"][0].shape[1] == encoder.hidden_size
