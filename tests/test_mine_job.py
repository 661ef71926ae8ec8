"""The mining job end to end on a real local Ray: JSONL pairs with bad rows, an extra corpus, several
FAISS shards; checked against the pure in-memory reference (raylib.mining.mine_in_memory)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylib import mining as M

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(scope="module")
def mean_dir(tmp_path_factory):
    """A tiny mean-pooled model: the CLS-pooled `tiny_dir` scores every pair within 1e-5, which
    leaves a relative cut nothing to separate."""
    from raylib.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("mine") / "tiny_mean", pooling="mean")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine_in")
    r = random.Random(0)
    good = []
    for i in range(50):
        q = " ".join(r.choices(WORDS, k=3))
        good.append({"query": q, "document": q + " " + " ".join(r.choices(WORDS, k=9)),
                     "source": "syn-a" if i % 2 else "syn-b", "language": "en", "id": f"p{i}"})
    for i in range(5):  # second positives of five queries
        good.append({"query": good[i]["query"], "document": " ".join(r.choices(WORDS, k=12)),
                     "source": "syn-b", "language": "en", "id": f"x{i}"})
    lines = [json.dumps(g) for g in good]
    lines += ["not json", json.dumps({"query": "", "document": "x"}), json.dumps({"query": "q only"})]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    corpus = [" ".join(r.choices(WORDS, k=12)) for _ in range(120)]
    corpus.append(good[7]["document"])  # a positive also listed in the corpus: must merge, not be a negative
    pq.write_table(pa.table({"document": corpus, "id": [f"c{i}" for i in range(len(corpus))]}),
                   root / "corpus.parquet")
    return root, good, corpus


@pytest.fixture
def patient_data_context(ray_session):
    """Worker start-up alone took 60-120 s when six sessions shared these 2 cores: allow 300 s
    without progress (still fails a real deadlock), then restore the session's value."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 300
    yield ray_session
    ctx.execution_no_progress_timeout_s = old


def _reference(model_dir, good, corpus, ratio, n_neg, k):
    from raylib.model import Encoder

    enc = Encoder.from_pretrained(model_dir)
    docs = list(dict.fromkeys([g["document"] for g in good] + corpus))
    pos_of: dict[str, list[str]] = {}
    for g in good:
        pos_of.setdefault(g["query"], []).append(g["document"])
    rule = M.NegativeRule(num_negatives=n_neg, max_pos_ratio=ratio, too_few="drop")
    sel, own, ref = M.mine_in_memory(
        enc.encode_dense([g["query"] for g in good], "query"), M.text_keys([g["query"] for g in good]),
        M.text_keys([g["document"] for g in good]), [M.text_keys(pos_of[g["query"]]) for g in good],
        enc.encode_dense(docs, "document"), M.text_keys(docs), rule, k)
    text_of = dict(zip(M.text_keys(docs).tolist(), docs))
    out = {}
    for i, g in enumerate(good):
        negs = [text_of[x] for x in sel.neg_ids[i] if x >= 0]
        out[g["id"]] = (sel.status[i], negs, float(own[i]), float(ref[i]))
    return out, pos_of


def test_mine_job_pairs_sharded_matches_reference(patient_data_context, mean_dir, inputs, tmp_path, capsys):
    from pathlib import Path

    from raylib.jobs.mine import main

    repo = Path(__file__).resolve().parents[1]

    root, good, corpus = inputs
    out = tmp_path / "mine" / "mined"
    ratio, n_neg, k = 0.98, 4, 40
    summary = main(["--config", str(repo / "jobs/configs/mine/debug.yaml"),
                    "--set", f"teacher={mean_dir}", "--set", f"input.path={root / 'pairs.jsonl'}",
                    "--set", f"input.corpus={root / 'corpus.parquet'}", "--set", "max_docs_per_shard=40",
                    "--set", f"candidates={k}", "--set", f"num_negatives={n_neg}",
                    "--set", f"max_pos_ratio={ratio}", "--set", f"output={out.parent}",
                    "--set", "resources.mine_batch_size=16"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["counts"] == summary["counts"]
    c = summary["counts"]
    assert c["input"] == len(good) + 3 and c["rejected"] == 3
    assert c["rejected_by_reason"] == {"empty:query": 1, "invalid_json": 1, "null:document": 1}
    assert c["adds_up"] and c["kept"] > 0 and c["dropped_too_few"] > 0
    assert summary["corpus"]["shards"] == 5 and summary["corpus"]["duplicates"] == 1
    assert summary["corpus"]["docs"] == len(set([g["document"] for g in good] + corpus))
    assert summary["histograms"]["negative_score"]["count"] == c["kept"] * n_neg
    assert json.loads((out.parent / "summary.json").read_text())["counts"] == c

    mined = pq.read_table(out).to_pylist()
    too_few = pq.read_table(summary["outputs"]["too_few"]).to_pylist()
    rejects = pq.read_table(summary["outputs"]["rejects"]).to_pylist()
    assert len(mined) == c["kept"] and len(too_few) == c["dropped_too_few"] and len(rejects) == 3
    assert {r["reason"] for r in too_few} == {"too_few_negatives"}

    ref, pos_of = _reference(mean_dir, good, corpus, ratio, n_neg, k)
    for row in mined:
        status, negs, own, cut_ref = ref[row["id"]]
        assert status == M.KEPT, row["id"]
        assert set(row["negatives"]) == set(negs), row["id"]
        assert not set(row["negatives"]) & set(pos_of[row["query"]])
        assert row["positive_score"] == pytest.approx(own, abs=1e-5)
        cut = M.percpos_threshold(np.array([cut_ref]), ratio)[0]
        assert max(row["negative_scores"]) <= cut + 1e-6
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
        assert len(row["negative_ids"]) == n_neg and row["source"] in ("syn-a", "syn-b")
    assert {r["id"] for r in too_few} == {i for i, v in ref.items() if v[0] == M.TOO_FEW_STATUS}


@pytest.mark.slow
def test_mine_job_beir_rank_window_curriculum_pad(patient_data_context, mean_dir, tmp_path):
    """BEIR input (qrels -> pairs, unknown ids rejected), M3's rank window, padding, margin order."""
    from pathlib import Path

    from raylib.jobs.mine import main

    repo = Path(__file__).resolve().parents[1]

    r = random.Random(1)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {f"d{i}": " ".join(r.choices(WORDS, k=10)) for i in range(60)}
    queries = {f"q{i}": " ".join(docs[f"d{i}"].split()[:3]) for i in range(20)}
    docs["d59"], queries["q20"] = "  ", ""  # empty texts: a rejected pair, a document left out
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n"
                                                for k, v in queries.items()))
    qrels = [f"q{i}\td{i}\t1" for i in range(20)] + ["q0\td30\t1", "q1\tmissing\t1", "q2\td31\t0",
                                                     "q20\td20\t1"]
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    out = tmp_path / "mine" / "mined"
    args = ["--config", str(repo / "jobs/configs/mine/debug.yaml"), "--set", f"teacher={mean_dir}",
            "--set", "input.kind=beir", "--set", f"input.path={beir}", "--set", "input.split=train",
            "--set", "strategy=rank_window", "--set", "range_min=2", "--set", "range_max=7",
            "--set", "candidates=7", "--set", "num_negatives=5", "--set", "too_few=pad",
            "--set", "order=margin", "--set", "seed=3", "--set", f"output={out.parent}"]
    summary = main(args)
    c = summary["counts"]
    assert c["input"] == 24 and c["rejected_by_reason"] == {
        "empty:query": 1, "not_positive:grade": 1, "unknown_document": 1}
    assert summary["corpus"]["rejected_by_reason"] == {"empty:document": 1}
    # a window of at most 5 ranks after the positive is removed: some rows get padded
    assert c["pairs"] == 21 and c["kept"] == 21 and c["padded"] > 0 and c["adds_up"]
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 21
    margins = [np.mean([row["positive_score"] - s for s in row["negative_scores"]]) for row in rows]
    assert all(a >= b - 1e-6 for a, b in zip(margins, margins[1:]))  # increasing hardness
    for row in rows:
        assert row["source"] == "beir" and row["positive_id"] == row["id"].split(":")[1]
        assert len(row["negatives"]) == 5 and row["positive"] not in row["negatives"]
        if row["query_id"] == "q0":
            assert not {"d0", "d30"} & set(row["negative_ids"])
    # Same seed, same negatives: each row's generator is M.row_seed(seed, query key, document key)
    # over content-hash keys (M.text_keys), so no rerun is needed here; that one seed picks the same
    # window sample and another seed another is tests/test_mining.py's rank-window test.
