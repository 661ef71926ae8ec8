"""Prepare training data: pre-tokenized per-source shards + a manifest (a Ray Data job).

The job lives in raylib/jobs/prepare.py (config, run, main); this file is the entry point for
`python jobs/prepare.py --config jobs/configs/prepare/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.prepare import main

if __name__ == "__main__":
    main()
