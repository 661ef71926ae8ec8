"""Runs a team can follow: evaluation during training (best checkpoint kept by nDCG@10), MLflow
(a real file store), TensorBoard files read back with TensorBoard's own reader, the model card, the
step line and the data stage line. A real `mlflow server` receiving the debug pipeline's finetune
run (config, loss per step, evaluation) is tests/test_multinode.py's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raylib.model_card import CardInfo, add_section, render_card
from raylib.progress import clock, stage_line, step_line
from raylib.tracking import (MlflowRun, MlflowSection, flat_params, metric_key, read_tensorboard,
                             write_tensorboard)
from raylib.train_eval import best_eval, evaluate_during_training, holdout_eval_set



def _mlflow_rows(uri: str, experiment: str):
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def test_step_line_names_every_loss_part_and_time_left():
    record = {"step": 12, "loss": 1.23456, "loss_dense@16": 1.1, "teacher_kl_dense": 0.13, "lr": 2e-5,
              "examples_per_s": 45.31, "tokens_per_s": 1234.4, "grad_norm": 3.0}
    line = step_line(record, 30, elapsed_s=62.0, steps_done=12)
    assert line == ("step 12/30 loss 1.2346 (loss_dense@16 1.1 teacher_kl_dense 0.13) lr 2.00e-05 45.3 ex/s "
                    "1,234 tok/s elapsed 0:01:02 left 0:01:33")
    bare = {k: v for k, v in record.items() if k not in ("loss_dense@16", "teacher_kl_dense")}
    assert "()" not in step_line(bare, 30, 1.0, 1) and " (" not in step_line(bare, 30, 1.0, 1)
    assert clock(3725) == "1:02:05" and clock(None) == "?"


def test_stage_line_rows_rate_and_time_left():
    assert stage_line("dataset_3", 250, 1000, 10.0) == "[data] dataset_3: 250/1,000 rows (25%) 25 rows/s, left 0:00:30"
    assert stage_line("d", 5, None, 1.0) == "[data] d: 5 rows 5 rows/s"


def test_holdout_eval_scores_each_query_against_all_held_out_documents(tiny_dir):
    from raylib.model import Encoder

    encoder = Encoder.from_pretrained(tiny_dir)
    texts = [("alpha beta", "alpha beta gamma"), ("delta", "delta epsilon"), ("zeta eta", "zeta eta theta")]
    rows = {"query_ids": encoder.tokenize([q for q, _ in texts], "query", None, padding=False)["input_ids"],
            "positive_ids": encoder.tokenize([d for _, d in texts], "document", None, padding=False)["input_ids"]}
    rows["negatives_ids"] = [[rows["positive_ids"][(i + 1) % 3]] for i in range(3)]  # shared: deduplicated
    data = holdout_eval_set(rows)
    assert data.sizes == {"queries": 3, "documents": 3} and data.qrels["q1"] == {"d1": 1}
    encoder.train()
    out = evaluate_during_training(encoder, data, ["dense", "sparse", "multivector"])
    assert encoder.training  # evaluation leaves the training mode as it was
    assert {"eval/dense/ndcg@10", "eval/sparse/recall@100", "eval/multivector/ndcg@10", "eval_s"} <= set(out)
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k.startswith("eval/"))
    assert out["eval/dense/recall@100"] == 1.0  # 3 documents: every positive is in the top 100
    assert best_eval([{"step": 1, "m": 0.2}, {"step": 2, "m": 0.5}, {"step": 3, "m": 0.5}], "m") == \
        {"step": 2, "score": 0.5, "metric": "m"}
    assert best_eval([{"step": 1, "m": 0.2}, {"step": 2, "m": 0.5}], "m", "min")["step"] == 1


def test_eval_section_rejects_bad_settings():
    from raylib.train_config import EvalSection

    with pytest.raises(ValueError, match="exactly one"):
        EvalSection(every_n_steps=5)
    with pytest.raises(ValueError, match="unknown metric"):
        EvalSection(metric="ndcg10")
    with pytest.raises(ValueError, match="holdout"):
        EvalSection(holdout=1.5)
    assert EvalSection(every_n_steps=5, holdout=0.1).score_attribute == "eval/dense/ndcg@10"


def test_mlflow_file_store_holds_params_metrics_and_artifacts(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    config = {"train": {"lr": 1e-5, "betas": [0.9, 0.99]}, "model": {"name_or_path": "tiny"}}
    run = MlflowRun.start(MlflowSection(enabled=True, experiment="unit"), uri, "r1", config)
    for step in (1, 2, 3):
        record = {"step": step, "loss": 1.0 / step, "loss@16": 2.0 / step, "time": 1.7e9 + step}
        if step == 2:
            record["eval/dense/ndcg@10"] = 0.5
        run.log_record(record)
    run.finish({"README.md": "# card", "curves.png": b"\x89PNG"}, tags={"best_step": "2"})
    df = _mlflow_rows(uri, "unit")
    row = df.iloc[0]
    assert row["params.train.lr"] == "1e-05" and row["params.train.betas"] == "[0.9, 0.99]"
    assert row["status"] == "FINISHED" and row["tags.best_step"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [m.step for m in client.get_metric_history(run.run_id, metric_key("eval/dense/ndcg@10"))] == [2]
    assert metric_key("loss@16") == "loss_at_16"
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"README.md", "curves.png"}
    assert flat_params({"a": {"b": 1, "c": {}}}) == {"a.b": "1", "a.c": "{}"}


def test_tensorboard_files_read_back_with_its_own_reader(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "time": 1.7e9 + s} for s in (1, 2, 3)]
    rows[1]["eval/dense/ndcg@10"] = 0.25
    write_tensorboard(rows, str(tmp_path / "tb"))
    scalars = read_tensorboard(str(tmp_path / "tb"))
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3] and scalars["loss"][1][1] == pytest.approx(0.5)
    assert scalars["eval/dense/ndcg@10"] == [(2, 0.25)]


def test_model_card_front_matter_sections_and_added_table(tmp_path):
    info = CardInfo(name="ft", job="finetune", base_model="minilm", recipe="Arctic-Embed 2.0 finetuning.",
                    objective={}, settings={"pooling": "mean", "normalize": True, "max_length": 256,
                                            "query_prefix": "", "document_prefix": "", "matryoshka_dims": [128]},
                    dim=384, heads=["dense"], hyperparameters={"learning rate": 2e-5},
                    data={"sources": {"docs/en": 900, "faq/en": 100}, "rows": 1000, "rejected": {"empty": 3},
                          "input": ["mined/"]},
                    step=30, total_steps=30, evaluations=[{"step": 10, "eval/dense/ndcg@10": 0.5},
                                                          {"step": 20, "eval/dense/ndcg@10": 0.7}],
                    best={"step": 20, "score": 0.7, "metric": "eval/dense/ndcg@10"}, eval_set="held-out")
    text = render_card(info)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "sentence-transformers" and meta["base_model"] == "minilm"
    assert "sentence-transformers" in meta["tags"] and meta["datasets"] == ["docs/en", "faq/en"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.7
    for needle in ("1,000 rows from 2 source(s)", "3 rejected (empty: 3)", "Matryoshka dims trained for: [128]",
                   "| 20 (best) | 0.7000 |", "SentenceTransformer(", "FlagModel(", "Encoder.from_pretrained",
                   "import_path: raylib.ray_serve.app:app"):
        assert needle in text, needle
    (tmp_path / "README.md").write_text(text)
    add_section(str(tmp_path), "Before / after", "| dense | 0.1 | 0.2 |")
    add_section(str(tmp_path), "Before / after", "| dense | 0.3 | 0.4 |")  # replaced, not repeated
    out = (tmp_path / "README.md").read_text()
    assert out.count("## Before / after") == 1 and "0.3 | 0.4" in out
    assert out.index("## Before / after") < out.index("## How to load")
    stamp = (tmp_path / "README.md").stat().st_mtime_ns
    add_section(str(tmp_path), "Before / after", "| dense | 0.3 | 0.4 |")  # unchanged: not rewritten
    assert (tmp_path / "README.md").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_finetune_keeps_best_checkpoint_by_ndcg_and_mlflow_agrees(tmp_path, ray_session):
    """The finetune debug job with eval every 10 steps on held-out rows: Ray Train keeps the best
    checkpoint by nDCG@10, the summary names its step, the MLflow run's best eval metric is at that
    step; every checkpoint carries a model card; TensorBoard files hold the same curve."""
    from mlflow.tracking import MlflowClient

    from raylib.jobs.finetune import main
    from raylib.model import Encoder
    from test_finetune import _synthetic

    pq.write_table(pa.table(_synthetic(200, 3)), tmp_path / "mined.parquet")
    sets = [f"data.paths=[{tmp_path / 'mined.parquet'}]", f"checkpoint.storage_path={tmp_path / 'runs'}",
            "train.max_steps=40", "data.epochs=2", "train.lr=2e-3", "checkpoint.every_steps=10", "checkpoint.num_to_keep=1",
            "eval.every_n_steps=10", "eval.holdout=0.2", "train.log_every=10",
            "tracking.mlflow.enabled=true", "tracking.mlflow.experiment=ft", "tracking.tensorboard.enabled=true"]
    summary = main(["--config", "jobs/configs/finetune/debug.yaml", *sum((["--set", s] for s in sets), [])])
    best = summary["eval"]
    assert best["metric"] == "eval/dense/ndcg@10" and summary["checkpoint"] == best["checkpoint"]
    run = Path(summary["output"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/dense/ndcg@10"] for r in rows if "eval/dense/ndcg@10" in r}
    assert sorted(evals) == [10, 20, 30, 40][:len(evals)] and len(evals) >= 3
    assert best["score"] == max(evals.values()) and evals[best["step"]] == best["score"]
    # Ray Train kept the best and the latest checkpoint, nothing else
    kept = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(kept) == (1 if best["step"] == max(evals) else 2), kept
    ckpt = Path(summary["checkpoint"])
    import torch

    assert torch.load(ckpt / "train_state.pt", weights_only=False)["next_step"] == best["step"]
    card = (ckpt / "README.md").read_text()
    assert f"at step {best['step']}" in card and "synthetic/en" in card and "BGE-M3" in card
    Encoder.from_pretrained(ckpt)  # the card does not get in the way of loading
    # MLflow: config params, every step's loss, the best eval step = the summary's
    df = _mlflow_rows(summary["tracking"]["mlflow"]["tracking_uri"], "ft")
    assert len(df) == 1 and df.iloc[0]["params.eval.every_n_steps"] == "10"
    client = MlflowClient(summary["tracking"]["mlflow"]["tracking_uri"])
    run_id = summary["tracking"]["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [r["step"] for r in rows]
    history = client.get_metric_history(run_id, "eval/dense/ndcg_at_10")
    top = max(m.value for m in history)
    assert {m.step for m in history if m.value == top} >= {best["step"]}
    assert min(m.step for m in history if m.value == top) == best["step"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"README.md", "summary.json", "curves.png"}
    tb = read_tensorboard(summary["tracking"]["tensorboard"])
    assert dict(tb["eval/dense/ndcg@10"]) == pytest.approx(evals)
