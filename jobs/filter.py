"""Curate query-document pairs with Ray Data: reject bad rows, heuristic filters, and top-k

The job lives in raylib/jobs/filter.py (config, run, main); this file is the entry point for
`python jobs/filter.py --config jobs/configs/filter/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.filter import main

if __name__ == "__main__":
    main()
