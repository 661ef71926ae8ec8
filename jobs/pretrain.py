"""Contrastive pretraining on Ray Train (Arctic-Embed 2.0 App. C).

The job lives in raylib/jobs/pretrain.py (config, run, main); this file is the entry point for
`python jobs/pretrain.py --config jobs/configs/pretrain/<hw>.yaml [--set key=value ...]` and `ray job submit`.
"""

from raylib.jobs.pretrain import main

if __name__ == "__main__":
    main()
