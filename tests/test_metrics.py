"""Our metrics against pytrec_eval (trec_eval's definitions) on adversarial random runs."""

import math
import random

import pytest
import pytrec_eval

from peers import require_peer
from raylib.metrics import evaluate, per_query


def _random_case(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(25):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}  # graded, some non-relevant
        if q % 7 == 3:
            continue  # query missing from the run
        retrieved = rng.sample(docs + [f"unjudged{i}" for i in range(20)], rng.randint(5, 70))
        # coarse scores -> many ties, broken by docid as trec_eval does
        run[qid] = {d: float(rng.randint(0, 8)) / 4 for d in retrieved}
    run["q_not_in_qrels"] = {"d1": 1.0}
    return qrels, run


def _pytrec_mrr10(qrels, run):
    cut = {q: dict(sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, docs in run.items()}
    return pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)


@pytest.mark.parametrize("seed", range(5))
def test_per_query_matches_pytrec_eval(seed):
    require_peer("pytrec-eval-terrier")
    qrels, run = _random_case(seed)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recall.10", "P.5"}).evaluate(run)
    mrr = _pytrec_mrr10(qrels, run)
    ours = per_query(qrels, run, ("ndcg@10", "recall@100", "recall@10", "precision@5", "mrr@10"))
    assert set(ours) == set(ref)
    for qid in ref:
        assert math.isclose(ours[qid]["ndcg@10"], ref[qid]["ndcg_cut_10"], abs_tol=1e-6)
        assert math.isclose(ours[qid]["recall@100"], ref[qid]["recall_100"], abs_tol=1e-6)
        assert math.isclose(ours[qid]["recall@10"], ref[qid]["recall_10"], abs_tol=1e-6)
        assert math.isclose(ours[qid]["precision@5"], ref[qid]["P_5"], abs_tol=1e-6)
        assert math.isclose(ours[qid]["mrr@10"], mrr[qid]["recip_rank"], abs_tol=1e-6)


def test_means_match_pytrec_eval():
    qrels, run = _random_case(42)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    mean = sum(v["ndcg_cut_10"] for v in ref.values()) / len(ref)
    assert math.isclose(evaluate(qrels, run, ["ndcg@10"])["ndcg@10"], mean, abs_tol=1e-6)


def test_unknown_metric_and_empty_overlap_are_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, ["ndcg"])
    with pytest.raises(ValueError, match="no query"):
        evaluate({"q": {"d": 1}}, {"other": {"d": 1.0}})
