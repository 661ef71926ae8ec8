"""Evaluate an embedding model on a BEIR data set (nDCG@10, Recall@100 with trec_eval's definitions).

  python jobs/evaluate.py --config jobs/configs/evaluate/debug.yaml
  python jobs/evaluate.py --model minilm --data ../shared/data/scifact --split test \
      [--set modes=dense,sparse,multivector,hybrid] [--set dims=384,128] [--set quantization=none,int8,binary]
      [--set mcls=256]   (MCLS, M3 App. B.2: dense only, torch backend)

`--model`, `--data`, `--split` and `--output` are shortcuts for `--set model=...` etc.; `--config` is
optional here. Result keys: `dense`, `dense@<dim>` (Matryoshka-truncated), `<key>/int8` and
`<key>/binary` (quantized corpus with float rescoring), `sparse`, `multivector`, `hybrid`.
Output location `output` (default runs/evaluate/<data>-<split>-<model>): summary.json.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raylib.config import parse_job_args
from raylib.jobs.summary import finish, seconds
from raylib.model import ModelSpec

SHORTCUTS = {"model": "model", "data": "data", "split": "split", "output": "output"}


@dataclass
class EvaluateConfig:
    """Config of the evaluation job (unknown keys are an error)."""

    model: str | ModelSpec = ""      # model dir or name (minilm, me5-small), or a ModelSpec mapping
    data: str = ""                   # BEIR dir (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)
    split: str = "test"
    modes: list[str] = field(default_factory=lambda: ["dense"])  # dense, sparse, multivector, hybrid
    dims: list[int] = field(default_factory=list)                 # Matryoshka truncations of dense
    quantization: list[str] = field(default_factory=lambda: ["none"])  # none, int8, binary
    batch_size: int = 64
    backend: str = "torch"           # torch, onnx (fp32) or onnx-int8 (raylib.backends)
    mcls: int = 0                    # M3 App. B.2 MCLS: a CLS every N tokens (paper: 256); 0 = off
    output: str = ""                 # local dir or s3:// (default runs/evaluate/<data>-<split>-<model>)

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (--{name} or --set {name}=...)")
        if self.mcls < 0 or (self.mcls and self.backend != "torch"):
            raise ValueError(f"mcls must be 0 (off) or N >= 1 tokens per CLS with backend=torch, "
                             f"got mcls={self.mcls}, backend={self.backend}")
        if not self.output:
            model = ModelSpec.of(self.model).name_or_path
            names = [Path(self.data.rstrip("/")).name, self.split, Path(str(model).rstrip("/")).name]
            self.output = str(Path("runs") / "evaluate" / "-".join(names))


def _load_data(location: str, split: str) -> Any:
    """The BEIR set from a local dir or s3:// (raylib.beir.load_beir_uri)."""
    from raylib.beir import load_beir_uri

    return load_beir_uri(location, split)


def run(cfg: EvaluateConfig) -> dict:
    """Encode the split's queries and corpus, score every mode; writes summary.json and reports."""
    from raylib.evaluation import evaluate_encoder
    from raylib.model import Encoder

    start = time.time()
    if cfg.backend == "torch":
        encoder = Encoder.from_pretrained(cfg.model)
    else:
        from raylib.backends import load_encoder

        encoder = load_encoder(cfg.model, cfg.backend)
    data = _load_data(cfg.data, cfg.split)
    print(f"[evaluate] {len(data.queries)} queries, {len(data.corpus)} documents", file=sys.stderr)
    results = evaluate_encoder(encoder, data, cfg.modes, cfg.dims, cfg.quantization,
                               batch_size=cfg.batch_size, show_progress=True, mcls=cfg.mcls or None)
    summary = {"model": str(cfg.model), "data": str(cfg.data), "split": cfg.split,
               "num_queries": len(data.queries), "num_documents": len(data.corpus),
               "empty_texts": data.empty_counts(), "results": results, "seconds": round(time.time() - start, 1), "config": asdict(cfg)}
    empty = summary["empty_texts"]
    lines = [f"{cfg.model} ({cfg.backend}) on {cfg.data} ({cfg.split}): {len(data.queries)} queries, "
             f"{len(data.corpus)} documents; {seconds(summary['seconds'])}",
             f"empty or whitespace-only texts, encoded as the peers do: {empty['empty_queries']} "
             f"queries, {empty['empty_documents']} documents"]
    lines += [f"{key}: " + ", ".join(f"{m} {v:.4f}" for m, v in values.items())
              for key, values in results.items()]
    return finish("evaluate", summary, cfg.output, lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_job_args(EvaluateConfig, __doc__.split("\n")[0], argv, shortcuts=SHORTCUTS))


if __name__ == "__main__":
    main()
