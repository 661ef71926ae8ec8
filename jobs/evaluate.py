"""Evaluate an embedding model on a BEIR data set; the last stdout line is one JSON object.

  python jobs/evaluate.py --model minilm --data ../shared/data/scifact --split test \
      [--modes dense,sparse,multivector,hybrid] [--dims 384,128] [--quantization none,int8,binary]

Result keys: `dense`, `dense@<dim>` (Matryoshka-truncated), `<key>/int8` and `<key>/binary`
(quantized corpus with float rescoring), `sparse`, `multivector`, `hybrid`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylib.beir import load_beir  # noqa: E402
from raylib.evaluation import evaluate_encoder  # noqa: E402
from raylib.model import Encoder  # noqa: E402


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model dir or name (minilm, me5-small)")
    p.add_argument("--data", required=True, help="BEIR dir (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test")
    p.add_argument("--modes", default="dense", type=_csv)
    p.add_argument("--dims", default="", type=lambda v: [int(x) for x in _csv(v)])
    p.add_argument("--quantization", default="none", type=_csv)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args(argv)
    start = time.time()
    encoder = Encoder.from_pretrained(args.model)
    data = load_beir(args.data, args.split)
    print(f"{len(data.queries)} queries, {len(data.corpus)} documents", file=sys.stderr)
    results = evaluate_encoder(encoder, data, args.modes, args.dims, args.quantization,
                               batch_size=args.batch_size, show_progress=True)
    summary = {"model": str(args.model), "data": str(args.data), "split": args.split,
               "results": results, "seconds": round(time.time() - start, 1)}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
