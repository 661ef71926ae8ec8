"""Pretraining: WSD schedule, the per-source batch plan, loss falling on a learnable task, and (slow,
Ray Train) exact resume after an injected worker failure with every example consumed once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raylib.config import load_config
from raylib.model import Encoder
from raylib.train_data import iter_steps, make_plan, split_sources, synthetic_pairs
from raylib.training import build_optimizer, build_encoder, plot_metrics, training_step
from raylib.train_config import ModelSection, TrainSection
from raylib.objectives.contrastive import ContrastiveObjective
from raylib.schedule import wsd_factor, wsd_scheduler

ROOT = Path(__file__).resolve().parents[1]

from test_s3 import s3_server  # noqa: E402,F401  (moto S3 fixture)


# ----------------------------------------------------------------------------- WSD
def test_wsd_warmup_stable_decay():
    f = [wsd_factor(s, 20, warmup=4, decay=5, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4:15] == [1.0] * 11
    assert f[15:] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(5)])
    # fractions of the total, and the paper's finetuning schedule: no warmup, decay over last 6000/9342
    assert wsd_factor(0, 100, warmup=0.1) == pytest.approx(0.1)
    assert wsd_factor(9341 - 6000, 9342, decay=6000) == 1.0
    assert wsd_factor(9342 - 6000, 9342, decay=6000) == 1.0
    assert wsd_factor(9341, 9342, decay=6000) == pytest.approx(1 / 6000)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = wsd_scheduler(opt, 10, warmup=2, decay=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0])


@pytest.mark.parametrize("kw", [dict(warmup=8, decay=5), dict(warmup=1.5), dict(decay=-1), dict(warmup=True)])
def test_wsd_rejects_bad_lengths(kw):
    with pytest.raises(ValueError):
        wsd_factor(0, 10, **kw)


# ----------------------------------------------------------------------------- data plan
def test_plan_one_source_per_batch_each_row_once_per_epoch_seeded():
    table = synthetic_pairs(300, {"web/en": 3.0, "news/de": 1.0, "wiki/es": 1.0}, seed=3)
    tables = split_sources(table)
    plan = make_plan(tables, global_batch=16, num_workers=2, seed=5, epochs=2)
    assert plan.total_steps == 2 * plan.steps_per_epoch
    assert plan.dropped_rows == sum(t.num_rows % 16 for t in tables.values())
    seen = [Counter(), Counter()]
    for step in range(plan.total_steps):
        source, rows = plan.rows_of(step)
        parts = [plan.rows_of(step, rank) for rank in range(2)]
        assert all(p[0] == source for p in parts) and np.array_equal(np.concatenate([p[1] for p in parts]), rows)
        ids = tables[source].take(rows).column("id").to_pylist()
        assert len(ids) == 16
        seen[step // plan.steps_per_epoch].update(ids)
    for epoch in seen:  # every kept row exactly once per epoch, in each epoch a different order
        assert max(epoch.values()) == 1 and sum(epoch.values()) == 300 - plan.dropped_rows
    first = [plan.rows_of(s)[0] for s in range(plan.steps_per_epoch)]
    assert Counter(first) == Counter(plan.source_batches)  # sources in proportion to their size
    # the plan depends only on the rows and the seed: not on their order in the files
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    again = make_plan(split_sources(shuffled), 16, 2, 5, 2)
    other = make_plan(tables, 16, 2, 6, 2)
    ids_of = lambda p, t, s: t[p.rows_of(s)[0]].take(p.rows_of(s)[1]).column("id").to_pylist()  # noqa: E731
    shuffled_tables = split_sources(shuffled)
    assert all(ids_of(plan, tables, s) == ids_of(again, shuffled_tables, s) for s in range(plan.total_steps))
    assert any(ids_of(plan, tables, s) != ids_of(other, tables, s) for s in range(plan.total_steps))
    # resuming at step k yields exactly the tail of the plan
    full = [(s, r["id"]) for s, r in iter_steps(plan, tables, 0, 1)]
    assert [(s, r["id"]) for s, r in iter_steps(plan, tables, 7, 1)] == full[7:]


def test_plan_per_source_batch_sizes():
    table = synthetic_pairs(300, {"web/en#len<=16": 2.0, "web/en#len<=64": 1.0}, seed=4)
    tables = split_sources(table)
    plan = make_plan(tables, global_batch=8, num_workers=2, seed=1, epochs=1,
                     batch_sizes={"#len<=16": 24})  # shorter texts, larger batches (M3 §3.4)
    assert plan.sizes == {"web/en#len<=16": 24, "web/en#len<=64": 8}
    rows_16, rows_64 = (tables[s].num_rows for s in ("web/en#len<=16", "web/en#len<=64"))
    assert plan.source_batches == {"web/en#len<=16": rows_16 // 24, "web/en#len<=64": rows_64 // 8}
    assert plan.dropped_rows == rows_16 % 24 + rows_64 % 8
    seen = Counter()
    for step in range(plan.total_steps):
        source, rows = plan.rows_of(step)
        parts = [plan.rows_of(step, rank)[1] for rank in range(2)]
        assert len(rows) == plan.sizes[source] and all(len(p) == len(rows) // 2 for p in parts)
        seen.update(tables[source].take(rows).column("id").to_pylist())
    assert max(seen.values()) == 1 and sum(seen.values()) == 300 - plan.dropped_rows
    # without overrides the plan is the single-size plan, step for step
    same = make_plan(tables, 8, 2, 1, 1, batch_sizes={})
    plain = make_plan(tables, 8, 2, 1, 1)
    assert all(np.array_equal(same.rows_of(s)[1], plain.rows_of(s)[1]) for s in range(plain.total_steps))
    with pytest.raises(ValueError, match="multiple"):
        make_plan(tables, 8, 2, 1, 1, batch_sizes={"#len<=16": 7})
    with pytest.raises(ValueError, match="several"):
        make_plan(tables, 8, 2, 1, 1, batch_sizes={"16": 8, "<=16": 8})


def test_plan_rejects_bad_input():
    tables = split_sources(synthetic_pairs(20, seed=0))
    with pytest.raises(ValueError, match="multiple"):
        make_plan(tables, global_batch=9, num_workers=2, seed=0, epochs=1)
    with pytest.raises(ValueError, match="full global batch"):
        make_plan(tables, global_batch=64, num_workers=1, seed=0, epochs=1)
    with pytest.raises(ValueError, match="source"):
        split_sources(synthetic_pairs(4).drop_columns(["source"]))


# ----------------------------------------------------------------------------- learning
def test_loss_falls_on_learnable_synthetic_task(tmp_path):
    table = synthetic_pairs(16 * 12, seed=1)
    tables = split_sources(table)
    plan = make_plan(tables, global_batch=16, num_workers=1, seed=0, epochs=2)
    t = TrainSection(lr=3e-3, warmup=3, decay=0.3)
    encoder = build_encoder(ModelSection(name_or_path="tiny", tiny={"hidden_size": 32}), seed=0).train()
    objective = ContrastiveObjective(temperature=0.05, query_max_length=16, document_max_length=32,
                                     matryoshka_dims=[16])
    optimizer = build_optimizer(encoder, t)
    scheduler = wsd_scheduler(optimizer, plan.total_steps, t.warmup, t.decay)
    records = []
    for step, rows in iter_steps(plan, tables, 0, 0):
        metrics, tokens = training_step(encoder, encoder, objective, rows, optimizer, scheduler, t,
                                        torch.device("cpu"))
        assert tokens > 0 and {"loss", "loss@32", "loss@16", "lr", "grad_norm"} <= set(metrics)
        records.append({"step": step + 1, "examples_per_s": 1.0, **metrics})
    losses = [r["loss@32"] for r in records]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_metrics([json.loads(line) for line in path.read_text().splitlines()])
    assert len(png) > 1000 and png[:4] == b"\x89PNG"


def test_configs_load():
    from raylib.jobs.pretrain import PretrainConfig

    for name in ("debug", "h100"):
        cfg = load_config(PretrainConfig, ROOT / "jobs" / "configs" / "pretrain" / f"{name}.yaml")
        assert isinstance(cfg.loss, ContrastiveObjective) and cfg.loss.temperature == 0.02
    assert cfg.data.global_batch_size == 32768 and cfg.loss.matryoshka_dims == [256]
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(PretrainConfig, None, ["train.lrr=1"])


# ----------------------------------------------------------------------------- Ray Train, resume
def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return Encoder.from_pretrained(checkpoint, device="cpu").state_dict()


def _consumed(run_dir: Path, workers: int) -> dict[int, list]:
    """step -> ids of the last attempt of that step (earlier attempts were rolled back)."""
    out: dict[int, list] = {}
    for rank in range(workers):
        for line in (run_dir / f"consumed_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], [None] * workers)[rank] = rec["ids"]
    return {s: [i for part in parts for i in part] for s, parts in sorted(out.items())}


def _resume_check(data: str, tmp_path: Path, extra: list[str]) -> None:
    """A run killed at step 7 by an injected failure ends with the weights of an uninterrupted run
    and consumed every planned example exactly once (each step's rows read from prepared shards)."""
    from raylib.jobs.pretrain import PretrainConfig
    from raylib.jobs.prepare import prepare_for_training
    from raylib.ray_train.loop import fit

    common = [f"data.paths=[{data}]", "data.global_batch_size=8", "data.epochs=1",
              f"checkpoint.storage_path={tmp_path / 'ckpt'}", "checkpoint.every_steps=3",
              "train.log_consumed=true", "train.grad_cache_chunk=2", "train.log_every=100",
              "scaling.num_workers=2", "scaling.max_failures=1", "synthetic.rows=0", *extra]
    config = ROOT / "jobs" / "configs" / "pretrain" / "debug.yaml"
    plain = load_config(PretrainConfig, config, common + ["checkpoint.name=plain"])
    failing = load_config(PretrainConfig, config, common + ["checkpoint.name=failing",
                                                                "train.fail_at_step=7"])
    a = fit(plain, plain.loss, prepare_for_training(plain, plain.loss))
    b = fit(failing, failing.loss, prepare_for_training(failing, failing.loss))
    fail_dir = Path(b["output"])
    assert (fail_dir / "failed_at_7").exists()  # the failure did happen (and once)
    steps = a["plan"]["total_steps"]
    assert steps == b["plan"]["total_steps"] >= 9
    wa, wb = _weights(a["checkpoint"]), _weights(b["checkpoint"])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    ca, cb = _consumed(Path(a["output"]), 2), _consumed(fail_dir, 2)
    assert list(cb) == list(range(steps)) and ca == cb
    ids = [i for part in cb.values() for i in part]
    assert len(ids) == len(set(ids)) == steps * 8  # every planned example exactly once
    lines = (fail_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, steps + 1))
    assert all("data_wait_s" in json.loads(x) for x in lines)
    assert (fail_dir / "curves.png").exists()
    return a, b


@pytest.mark.slow
def test_injected_failure_resumes_exactly_from_s3(ray_session, tmp_path, s3_server):
    """With the pairs and the prepared shards on s3:// (moto), where a cluster without a shared disk
    keeps them: both runs share one prepared location (the second reuses its manifest); workers
    read their rows from S3. (The same runs with everything on local disk took as long and tested
    no other code: the storage layer is one pyarrow filesystem either way; the local default of
    the prepared location is checked by tests/test_jobs.py's pretrain run.)"""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="train")
    data = tmp_path / "pairs.parquet"
    pq.write_table(synthetic_pairs(8 * 12, {"web/en": 2.0, "news/de": 1.0}, seed=2), data)
    s3.upload_file(str(data), "train", "pairs/part-0.parquet")
    a, b = _resume_check("s3://train/pairs/", tmp_path, ["data.prepared=s3://train/prepared",
                                                         "data.row_group_rows=3"])
    assert a["prepared"]["location"] == b["prepared"]["location"] == "s3://train/prepared"
    assert not a["prepared"]["reused"] and b["prepared"]["reused"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="train", Prefix="prepared/")["Contents"]]
    assert "prepared/manifest.json" in keys and sum(k.endswith(".parquet") for k in keys) == 2
