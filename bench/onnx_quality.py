"""Quality of the ONNX backends against torch: cosine of each text's embedding to torch's on
SciFact texts (test queries + the first --docs corpus documents), and SciFact test nDCG@10 of
the backend (torch's: 0.6451 for minilm).

    python bench/onnx_quality.py --model minilm --backends onnx-int8 [--docs 500] [--no-ndcg]

Data: ../shared/data/scifact relative to the repository. Last stdout line: one JSON object.
The same nDCG comes from the evaluate job's `backend` option (raylib.backends.load_encoder
+ raylib.evaluation.evaluate_encoder, which this script calls).
"""

import argparse
import os
import time

import numpy as np
from toolkit import SHARED_DATA, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def backend_quality(model: str, backend: str, data, texts: list[str], ref: np.ndarray,
                    threads: int | None, ndcg: bool) -> dict:
    """Cosine to the torch vectors of `texts`, then (optionally) the full BEIR evaluation."""
    from raylib.evaluation import evaluate_encoder
    from raylib.backends import load_encoder

    encoder = load_encoder(model, backend, device="cpu", threads=threads)
    start = time.perf_counter()
    got = encoder.encode(texts, kind="document", batch_size=32)["dense"]
    out: dict = {"encode_s": round(time.perf_counter() - start, 1)}
    cos = (got * ref).sum(1)
    out["cosine"] = {"min": round(float(cos.min()), 5), "p1": round(float(np.percentile(cos, 1)), 5),
                     "mean": round(float(cos.mean()), 5), "n": len(cos)}
    if ndcg:
        start = time.perf_counter()
        res = evaluate_encoder(encoder, data, modes=("dense",), batch_size=32)
        out["scifact_test"] = {k: round(v, 4) for k, v in res["dense"].items()}
        out["eval_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--backends", default="onnx-int8")
    p.add_argument("--docs", type=int, default=500, help="corpus documents in the cosine check")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--no-ndcg", action="store_true")
    args = p.parse_args()

    from raylib.beir import load_beir
    from raylib.backends import load_encoder

    data = load_beir(SHARED_DATA / "scifact", split="test")
    docs = [t for t in data.doc_texts()[:args.docs] if t.strip()]
    texts = [q for q in data.queries.values() if q.strip()] + docs
    torch_enc = load_encoder(args.model, "torch", device="cpu", threads=args.threads)
    ref = torch_enc.encode(texts, kind="document", batch_size=32)["dense"]
    del torch_enc
    report: dict = {"model": args.model, "texts": len(texts), "loadavg": os.getloadavg()[0]}
    for backend in args.backends.split(","):
        report[backend] = backend_quality(args.model, backend, data, texts, ref, args.threads,
                                          not args.no_ndcg)
        print(f"{backend}: {report[backend]}", flush=True)
    emit(__file__, report)


if __name__ == "__main__":
    main()
