"""Finetune an embedding model on mined hard negatives with Ray Train (Arctic-Embed 2.0 App. C), or

The job lives in raylib/jobs/finetune.py (config, run, main); this file is the entry point for
`python jobs/finetune.py --config jobs/configs/finetune/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.finetune import main

if __name__ == "__main__":
    main()
