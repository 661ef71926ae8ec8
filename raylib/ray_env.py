"""Starting or joining Ray, one way for every job and test (Ray glue: the core never imports this)."""

from __future__ import annotations

import os

FORWARDED_ENV = ("HF_HUB_OFFLINE", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM", "RAYLIB_CACHE",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


# Data-plane workers (read, filter, embed, write) process block after block in long-lived
# processes. Arrow's default mimalloc pool and glibc's per-thread arenas keep freed pages, so a
# worker's footprint then grows with the number of blocks it has seen: 507 -> 1324 MiB from 100k
# to 1M pairs in bench/filter_scale.py's read stage. The system pool with two arenas returns
# them (322 -> 416 MiB). Defaults only: the caller's environment wins.
DATA_WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}


_STARTED_HERE: list[bool] = []  # non-empty once this process started its own local Ray


def init_data_ray(num_cpus: int | None = None, block_mib: int | None = 16, **kwargs) -> None:
    """`init_ray` for the Ray Data jobs (filter, mine): workers get DATA_WORKER_ENV, Parquet is
    read one task per file, and Ray Data blocks are capped at `block_mib` (Ray's default, 128 MiB,
    coalesces 450k short pairs into one block, and row-level stages hold a block's worth of
    Python objects)."""
    from ray.data import DataContext

    env = {k: os.environ.get(k, v) for k, v in DATA_WORKER_ENV.items()}
    init_ray(num_cpus, extra_env=env, **kwargs)
    from raylib.ray_data.progress import install_compact_progress

    install_compact_progress()  # off a terminal: one progress line per dataset per 10 s
    ctx = DataContext.get_current()
    if block_mib:
        ctx.target_max_block_size = block_mib << 20
    # Ray 2.60's V2 Parquet reader reads a listing block's files (7 of 20 files at 1M pairs) in
    # one task whose memory grows with them (404 MiB private at 1M vs under 100 at 100k); the
    # classic reader runs one task per file and stays flat (160 -> 166 MiB).
    ctx.use_datasource_v2 = False


def init_ray(num_cpus: int | None = None, address: str | None = None, attempts: int = 3,
             extra_env: dict[str, str] | None = None, **kwargs) -> bool:
    """The one way every job, the pipeline, Serve and the benches reach Ray. Joins `address`
    ("auto": a running local Ray) or $RAY_ADDRESS (`ray job submit`, a cluster) if given, else
    starts a local Ray with `num_cpus` scheduling tokens (more than cores, so actors never starve
    read tasks). Returns True when it joined a running cluster.

    A local start includes the dashboard: Ray Train's PlacementGroupCleaner polls the controller
    through the State API, which the dashboard serves; without it every poll logs "Failed to query
    Ray Train Controller actor state" (once a second for the whole fit). A local start is retried:
    Ray's raylet start-up limit (30 s, fixed) is exceeded on an overloaded host. The job's
    environment (offline hub, auth mode, S3 endpoint) is forwarded to the workers.
    """
    import ray

    if ray.is_initialized():
        return not _STARTED_HERE
    env = {"env_vars": {**(extra_env or {}),
                        **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}}
    kwargs.setdefault("runtime_env", env)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
        return True
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=None, **kwargs)
            _STARTED_HERE.append(True)
            return False
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
    raise AssertionError("unreachable")
