"""One pipeline from raw pairs to a served model: data -> filter -> mine -> pretrain (optional)

The job lives in raylib/jobs/pipeline.py (config, run, main); this file is the entry point for
`python jobs/pipeline.py --config jobs/configs/pipeline/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.pipeline import main

if __name__ == "__main__":
    main()
