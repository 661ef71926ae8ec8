"""Starting or joining Ray, one way for every job and test (Ray glue: the core never imports this)."""

from __future__ import annotations

import os

FORWARDED_ENV = ("HF_HUB_OFFLINE", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM", "RAYLIB_CACHE",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def init_ray(num_cpus: int | None = None, address: str | None = None, attempts: int = 3, **kwargs) -> None:
    """Join `address` or $RAY_ADDRESS (`ray job submit`, a cluster) if given, else start a local Ray
    with `num_cpus` scheduling tokens (more than cores, so actors never starve read tasks).

    A local start is retried: Ray's raylet start-up limit (30 s, fixed) is exceeded on an
    overloaded host. The job's environment (offline hub, auth mode, S3 endpoint) is forwarded.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    kwargs.setdefault("runtime_env", env)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
        return
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
