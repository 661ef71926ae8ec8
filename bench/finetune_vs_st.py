"""Our finetune job against sentence-transformers' trainer on the same mined SciFact rows.

  python bench/finetune_vs_st.py [--steps 0] [--negatives 3] [--batch 16] [--out runs/bench_scifact]

Both start from minilm and see the same rows in the same batches (bench/finetune_scifact.py's
cached mining pass and its seeded batch order), with the same batch size, steps, learning rate,
WSD schedule (no warmup, linear decay over the last half), AdamW (betas 0.9/0.999, eps 1e-8,
weight decay 0.01 except biases and norms), gradient clipping at 1.0, fp32, one CPU process:
- ours: raylib.training.training_step with the FinetuneObjective (InfoNCE over every
  document of the batch: positives + hard negatives, temperature tau), `--trainer ray` for the
  Ray Train job itself (its own batch plan: same rows, other batches);
- theirs: SentenceTransformerTrainer + MultipleNegativesRankingLoss(scale = 1/tau) over
  (anchor, positive, negative_1..n) columns: the same candidates (all positives and hard negatives
  of the batch, cosine similarity of normalized embeddings x scale).
What still differs: the batch sampler (ours in both by default; `--st-sampler` gives theirs its own
BatchSamplers.BATCH_SAMPLER shuffle), dropout masks (each its own RNG), query truncation (ours 64
tokens, theirs max_seq_length = --doc-max-length for every column; SciFact queries are shorter
than 64 tokens: the count longer is printed), tokenization happens in their collator.
SciFact test nDCG@10 of both by the same evaluation (exact search, trec_eval nDCG@10); the last
stdout line is a JSON with `ours`, `st`, `ours_vs_st` (ours / theirs).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from finetune_scifact import RECIPES, _ints, batch_order, dense_ndcg, finetune, finetune_config, prepare
from toolkit import SHARED_DATA, emit

from raylib.model import Encoder


def st_columns(table: dict, steps: list[np.ndarray], num_negatives: int) -> dict[str, list[str]]:
    """(anchor, positive, negative_1..n) rows in step order: each step's groups exactly as our
    objective builds them (raylib.objectives.finetune.select_groups, short rows filled alike)."""
    from raylib.objectives.finetune import select_groups

    g = 1 + num_negatives
    cols = {"anchor": [], "positive": [], **{f"negative_{j + 1}": [] for j in range(num_negatives)}}
    for idx in steps:
        rows = {c: [v[i] for i in idx] for c, v in table.items()}
        docs = select_groups(rows, num_negatives).documents
        for r in range(len(idx)):
            cols["anchor"].append(rows["query"][r])
            cols["positive"].append(docs[r * g])
            for j in range(num_negatives):
                cols[f"negative_{j + 1}"].append(docs[r * g + 1 + j])
    return cols


def train_st(cols: dict, args, total: int, decay_steps: int, out: Path) -> dict:
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss(scale=1/tau) on `cols` in order."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import BatchSampler, SequentialSampler

    from raylib.registry import resolve_model_path

    class InOrder(SentenceTransformerTrainer):
        """Batches of consecutive rows: the columns already hold our step order."""

        def get_batch_sampler(self, dataset, batch_size, drop_last, *a, **kw):
            return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=True)

    model = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    model.max_seq_length = args.doc_max_length
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    if args.matryoshka_dims:  # raylib.losses.matryoshka: full-dim loss + each prefix's, weight 1
        from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

        full = model.get_sentence_embedding_dimension()
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=[full, *args.matryoshka_dims])
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_trainer"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=0, max_grad_norm=1.0,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": decay_steps, "decay_type": "linear", "min_lr_ratio": 0.0},
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=args.seed, data_seed=args.seed,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_drop_last=True,
        disable_tqdm=True)
    trainer_cls = SentenceTransformerTrainer if args.st_sampler else InOrder
    trainer = trainer_cls(model=model, args=targs, train_dataset=Dataset.from_dict(cols), loss=loss)
    trainer.train()
    path = out / "st_model"
    model.save(str(path))
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"checkpoint": str(path), "lrs": [r["learning_rate"] for r in logs],
            "losses": [r["loss"] for r in logs], "steps": trainer.state.global_step}


def main(argv: list[str] | None = None) -> dict:
    base = RECIPES["base"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED_DATA / "scifact"))
    p.add_argument("--out", default="runs/bench_scifact")
    p.add_argument("--negatives", type=int, default=base["negatives"])
    p.add_argument("--mine-negatives", type=int, default=7)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--max-pos-ratio", type=float, default=0.95)
    p.add_argument("--batch", type=int, default=base["batch"])
    p.add_argument("--epochs", type=int, default=base["epochs"])
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--lr", type=float, default=base["lr"])
    p.add_argument("--decay", type=float, default=base["decay"])
    p.add_argument("--temperature", type=float, default=base["temperature"])
    p.add_argument("--doc-max-length", type=int, default=base["doc_max_length"])
    p.add_argument("--matryoshka-dims", type=_ints, default=[],
                   help="Matryoshka on both sides (ours: objective.matryoshka_dims; theirs: "
                        "MatryoshkaLoss over MNRL), scored at these dims too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trainer", choices=("inprocess", "ray"), default="inprocess",
                   help="ours: the loop's step in this process on the same batches (default), or "
                        "the Ray Train job (its own batch plan)")
    p.add_argument("--st-sampler", action="store_true",
                   help="let sentence-transformers shuffle with its own sampler instead of our order")
    p.add_argument("--only", choices=("both", "ours", "st"), default="both")
    p.add_argument("--reuse", action="store_true",
                   help="score checkpoints a previous run of the same settings left under --out")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq
    import torch

    from raylib.schedule import resolve_steps

    torch.set_num_threads(args.threads)
    start, timings = time.time(), {}
    prep = prepare(args)
    mrl = "".join(f"_m{d}" for d in args.matryoshka_dims)
    out = prep["out"] / f"vs_st_s{args.steps}_n{args.negatives}_b{args.batch}{mrl}"
    test = prep["test"]
    table = pq.read_table(prep["mined_path"]).to_pydict()
    steps = batch_order(len(table["query"]), args.batch, args.epochs, args.seed, args.steps)
    total = len(steps)
    decay_steps = resolve_steps(args.decay, total, "decay")
    teacher_tok = Encoder.from_pretrained("minilm", device="cpu")
    long_queries = sum(len(ids) > 64 for ids in teacher_tok.tokenize(
        table["query"], "query", 512, padding=False)["input_ids"])
    del teacher_tok
    result = {"before_ndcg@10": round(prep["before_ndcg@10"], 4), "steps": total,
              "decay_steps": decay_steps, "queries_longer_than_64_tokens": int(long_queries)}
    doc_texts = test.doc_texts()

    def score(checkpoint: str, name: str) -> float:
        model = Encoder.from_pretrained(checkpoint, device="cpu", max_length=args.doc_max_length)
        emb = model.encode_dense(doc_texts, kind="document", batch_size=64)
        for dim in args.matryoshka_dims:
            result[f"{name}_dim{dim}"] = round(dense_ndcg(model, test, emb, dim), 4)
        return dense_ndcg(model, test, emb)

    if args.only in ("both", "ours"):
        ours_args = argparse.Namespace(**{**base, **vars(args), "recipe": "base", "cpus": 2.0})
        cfg = finetune_config(ours_args, prep["mined_path"], out)
        t = time.time()
        done = out / f"inprocess_{cfg.checkpoint.name}" / "model"
        summary = ({"checkpoint": str(done)} if args.reuse and args.trainer == "inprocess"
                   and done.exists() else finetune(cfg, args.trainer, out))
        timings["ours_train_s"] = round(time.time() - t, 1)
        t = time.time()
        result["ours"] = round(score(summary["checkpoint"], "ours"), 4)
        timings["ours_eval_s"] = round(time.time() - t, 1)
        result["ours_lrs"] = [round(x, 10) for x in summary.get("lrs", [])]
        print(f"ours: SciFact test nDCG@10 = {result['ours']:.4f}", flush=True)
    if args.only in ("both", "st"):
        t = time.time()
        st = ({"checkpoint": str(out / "st_model"), "lrs": [], "losses": [], "steps": total}
              if args.reuse and (out / "st_model").exists()
              else train_st(st_columns(table, steps, args.negatives), args, total, decay_steps, out))
        timings["st_train_s"] = round(time.time() - t, 1)
        t = time.time()
        result["st"] = round(score(st["checkpoint"], "st"), 4)
        timings["st_eval_s"] = round(time.time() - t, 1)
        result.update({"st_lrs": st["lrs"], "st_losses": st["losses"], "st_steps": st["steps"]})
        print(f"sentence-transformers: SciFact test nDCG@10 = {result['st']:.4f}", flush=True)
    if "ours" in result and "st" in result:
        result["ours_vs_st"] = round(result["ours"] / result["st"], 4)
    result.update({"args": vars(args), "timings": timings, "seconds": round(time.time() - start, 1)})
    emit(__file__, result)
    return result


if __name__ == "__main__":
    main()
