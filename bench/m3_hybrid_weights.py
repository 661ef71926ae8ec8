"""Choose an M3 checkpoint's hybrid weights on the dev split, then score SciFact test once.

  python bench/m3_hybrid_weights.py --model runs/bench_scifact/inprocess_finetune_scifact_m3/model [--dev 100]

The corpus and both query sets are encoded once (dense, sparse, multi-vector); every weight triple
of the grid is scored on the dev queries (the same held-out train queries as
bench/finetune_scifact.py --dev N, seed 0); the best by dev nDCG@10 is then scored on test. The last
stdout line is a JSON with the dev grid, the chosen weights and the test heads.
"""

from __future__ import annotations

import argparse
import itertools

from finetune_scifact import split_dev
from toolkit import SHARED_DATA, emit

from raylib.beir import load_beir
from raylib.evaluation import encode_all, evaluate_encoded
from raylib.model import Encoder

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

    def score(data, q, weights):
        qids = list(data.queries)
        res = evaluate_encoded(q, docs, qids, dids, data.qrels, MODES, metrics=["ndcg@10"], weights=weights)
        return {m: round(res[m]["ndcg@10"], 4) for m in MODES}

    q_dev = encode(encoder, [dev.queries[i] for i in dev.queries], "query")
    grid = [(d, s, round(1 - d - s, 2)) for d, s in itertools.product((0.2, 0.3, 0.4, 0.5), (0.0, 0.05, 0.1, 0.2))]
    dev_results = {str(list(w)): score(dev, q_dev, list(w)) for w in grid}
    best = max(grid, key=lambda w: dev_results[str(list(w))]["hybrid"])
    for w in grid:
        print(f"dev weights {w}: {dev_results[str(list(w))]}", flush=True)
    q_test = encode(encoder, [test.queries[i] for i in test.queries], "query")
    test_heads = score(test, q_test, list(best))
    print(f"chosen on dev: {best}; test {test_heads}", flush=True)
    return emit(__file__, {"model": args.model, "chosen_weights": list(best),
                           "dev_chosen": dev_results[str(list(best))], "test_heads": test_heads,
                           "dev_grid": dev_results})


if __name__ == "__main__":
    main()
