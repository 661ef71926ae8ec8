"""Shared fixtures: tiny seeded models and one local Ray instance per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny BERT encoder with M3 heads (dense + sparse + multi-vector)."""
    from raylib.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("tiny") / "model", m3_heads=True)


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory):
    """A saved tiny XLM-R encoder in the BGE-M3 layout."""
    from raylib.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_xlmr") / "model", arch="xlm-roberta",
                             m3_heads=True)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session (ray.init takes 5-9 s here). 8 CPU tokens on 2 cores,
    so actors and train workers never starve the read/write tasks (see RAY_NOTES.md)."""
    import ray
    from ray.data import DataContext

    from raylib.ray_env import init_ray

    init_ray(num_cpus=8, log_to_driver=False)
    DataContext.get_current().execution_no_progress_timeout_s = 120
    yield ray
    ray.shutdown()
