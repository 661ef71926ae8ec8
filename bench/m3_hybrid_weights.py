"""Choose an M3 checkpoint's hybrid weights on the dev split, then score SciFact test once.

  python bench/m3_hybrid_weights.py --model runs/bench_scifact/inprocess_finetune_scifact_m3/model [--dev 100]

The corpus and both query sets are encoded once (dense, sparse, multi-vector) and each head's full
score matrix computed once per query set (raylib.scoring.score_encoded); every weight triple of
the grid (the 0.1-step simplex, at least two heads weighted) only fuses and ranks those
(raylib.evaluation.evaluate_scores) on the dev queries (the same held-out train queries as
bench/finetune_scifact.py --dev N, seed 0); the best by dev nDCG@10 is then scored on test. The last
stdout line is a JSON with the dev grid, the chosen weights and the test heads.
"""

from __future__ import annotations

import argparse
import itertools

from finetune_scifact import split_dev
from toolkit import SHARED_DATA, emit

from raylib.beir import load_beir
from raylib.evaluation import encode_all, evaluate_encoded, evaluate_scores
from raylib.model import Encoder
from raylib.scoring import hybrid_scores, score_encoded

MODES = ["dense", "sparse", "multivector", "hybrid"]


def encode(encoder: Encoder, texts: list[str], kind: str) -> dict:
    return encode_all(encoder, texts, kind, dense=True, sparse=True, multivector=True, batch_size=64)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(SHARED_DATA / "scifact"))
    p.add_argument("--dev", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    test, train = load_beir(args.data, "test"), load_beir(args.data, "train")
    _, dev = split_dev(train, args.dev, args.seed)
    encoder = Encoder.from_pretrained(args.model, device="cpu")
    docs = encode(encoder, test.doc_texts(), "document")
    dids = test.doc_ids()

    def heads(data, q) -> tuple[dict, dict]:
        """Each single head's nDCG@10 (dense: the evaluate job's exact search; sparse and
        multi-vector: the evaluate job's ranking of the full score matrix) and the matrices."""
        full, qids = score_encoded(q, docs), list(data.queries)
        res = {"dense": evaluate_encoded(q, docs, qids, dids, data.qrels, ["dense"], metrics=["ndcg@10"])["dense"],
               **{m: evaluate_scores(full[m], qids, dids, data.qrels) for m in ("sparse", "multivector")}}
        return {m: round(res[m]["ndcg@10"], 4) for m in MODES[:3]}, full

    def hybrid(data, full: dict, weights) -> float:
        fused = hybrid_scores(full["dense"], full["sparse"], full["multivector"], weights)
        return round(evaluate_scores(fused, list(data.queries), dids, data.qrels)["ndcg@10"], 4)

    dev_single, dev_full = heads(dev, encode(encoder, [dev.queries[i] for i in dev.queries], "query"))
    grid = [(d / 10, s / 10, (10 - d - s) / 10) for d, s in itertools.product(range(11), range(11))
            if d + s <= 10 and sum(x > 0 for x in (d, s, 10 - d - s)) >= 2]
    dev_results = {str(list(w)): {**dev_single, "hybrid": hybrid(dev, dev_full, w)} for w in grid}
    best = max(grid, key=lambda w: dev_results[str(list(w))]["hybrid"])
    for w in grid:
        print(f"dev weights {w}: {dev_results[str(list(w))]}", flush=True)
    test_single, test_full = heads(test, encode(encoder, [test.queries[i] for i in test.queries], "query"))
    test_heads = {**test_single, "hybrid": hybrid(test, test_full, best)}
    print(f"chosen on dev: {best}; test {test_heads}", flush=True)
    return emit(__file__, {"model": args.model, "chosen_weights": list(best),
                           "dev_chosen": dev_results[str(list(best))], "test_heads": test_heads,
                           "dev_grid": dev_results})


if __name__ == "__main__":
    main()
