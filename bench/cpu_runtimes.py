"""CPU runtimes for one encoder, same batches, same threads: torch (raylib.model.Encoder), ONNX
Runtime fp32 and int8 (the graphs raylib.backends exports beside the model), and OpenVINO on
those graphs (fp32 and bf16 inference precision) when `openvino` is installed (`pip install
'.[bench]'`). Decides whether OpenVINO earns a Serve backend: it would have to beat onnx-int8.

    python bench/cpu_runtimes.py --model minilm --texts 200 --batch 8 --threads 1

Batches are what the Serve Encoder forms under load: SciFact documents cut to --max-chars,
sorted by token length, --batch texts each. Throughput is the best of --repeats passes. Last
stdout line: one JSON object of texts/s per runtime and each one's ratio to torch.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
from toolkit import emit, scifact_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def padded_batches(ids: list[list[int]], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask) int64 pairs of length-sorted batches."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = []
    for s in range(0, len(ids), batch):
        rows = [ids[i] for i in order[s:s + batch]]
        arr = np.zeros((len(rows), max(map(len, rows))), np.int64)
        mask = np.zeros_like(arr)
        for j, row in enumerate(rows):
            arr[j, :len(row)], mask[j, :len(row)] = row, 1
        out.append((arr, mask))
    return out


def texts_per_s(run, batches, repeats: int) -> float:
    """Best of `repeats` passes over every batch, after one warm-up call."""
    run(*batches[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for ids, mask in batches:
            run(ids, mask)
        best = min(best, time.perf_counter() - start)
    return sum(len(ids) for ids, _ in batches) / best


def feeds(names: list[str], ids: np.ndarray, mask: np.ndarray) -> dict:
    """The graph's inputs (BERT graphs also take token_type_ids)."""
    given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: given[k] for k in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--max-chars", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    from raylib.backends import load_encoder
    from raylib.registry import resolve_model_path

    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.model, "torch", device="cpu", threads=args.threads)
    for backend in ("onnx", "onnx-int8"):  # exports the graphs beside the model if absent
        load_encoder(args.model, backend, device="cpu", threads=args.threads)
    graphs = Path(resolve_model_path(args.model)) / "onnx"
    ids = encoder.tokenize(scifact_texts(args.texts, args.max_chars), "document",
                           encoder.settings.max_length, padding=False)["input_ids"]
    batches = padded_batches(ids, args.batch)
    report: dict = {"model": args.model, "texts": len(ids), "batch": args.batch,
                    "threads": args.threads, "texts_per_s": {}}
    rates = report["texts_per_s"]

    model = encoder.model  # the torch forward alone: tokenization is outside every runtime here
    with torch.inference_mode():
        rates["torch"] = texts_per_s(lambda i, m: model(torch.from_numpy(i), torch.from_numpy(m)),
                                     batches, args.repeats)
    for name, label in (("model.onnx", "onnxruntime_fp32"), ("model_int8.onnx", "onnxruntime_int8")):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(graphs / name), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        rates[label] = texts_per_s(lambda i, m: sess.run(None, feeds(names, i, m)), batches,
                                   args.repeats)
    try:
        import openvino as ov
    except ImportError:
        report["openvino"] = "not installed (pip install '.[bench]')"
    else:
        core = ov.Core()
        for name, graph in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
            for precision in ("f32", "bf16"):
                compiled = core.compile_model(core.read_model(str(graphs / graph)), "CPU", {
                    "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": precision,
                    "PERFORMANCE_HINT": "LATENCY"})
                request = compiled.create_infer_request()
                names = [i.get_any_name() for i in compiled.inputs]
                rates[f"openvino_{name}_graph_{precision}"] = texts_per_s(
                    lambda i, m: request.infer(feeds(names, i, m)), batches, args.repeats)
    report["vs_torch"] = {k: round(v / rates["torch"], 2) for k, v in rates.items()}
    report["texts_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    for k, v in report["texts_per_s"].items():
        print(f"{k:34s} {v:8.1f} texts/s  {report['vs_torch'][k]:5.2f}x torch", flush=True)
    emit(__file__, report)


if __name__ == "__main__":
    main()
