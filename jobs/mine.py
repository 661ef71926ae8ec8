"""Teacher scoring and hard-negative mining (Arctic-Embed 2.0 §2.4 TopK-PercPos, BGE-M3 rank window).

The job lives in raylib/jobs/mine.py (config, run, main); this file is the entry point for
`python jobs/mine.py --config jobs/configs/mine/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.mine import main

if __name__ == "__main__":
    main()
