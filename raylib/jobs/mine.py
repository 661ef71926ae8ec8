"""Teacher scoring and hard-negative mining (Arctic-Embed 2.0 §2.4 TopK-PercPos, BGE-M3 rank window).

  python jobs/mine.py --config jobs/configs/mine/debug.yaml [--set strategy=rank_window ...]

Reads pairs (Parquet/JSONL, local or s3://) or a BEIR split, embeds the corpus and the queries with
the teacher in Ray Data actor pools, searches sharded FAISS indexes, selects negatives and writes
Parquet (query, positive, negatives, positive_score, negative_scores, source, language, ids).
The last stdout line is the summary JSON (also written next to the output).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylib.config import parse_job_args  # noqa: E402
from raylib.ray_data.mining import MineJobConfig, ray_init_for_job, run_mining  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(MineJobConfig, __doc__.split("\n")[0], argv)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    ray_init_for_job(cfg.resources.ray_num_cpus)
    summary = run_mining(cfg)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
