"""Evaluate an embedding model on a BEIR data set (nDCG@10, Recall@100 with trec_eval's definitions).

The job lives in raylib/jobs/evaluate.py (config, run, main); this file is the entry point for
`python jobs/evaluate.py --config jobs/configs/evaluate/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.evaluate import main

if __name__ == "__main__":
    main()
