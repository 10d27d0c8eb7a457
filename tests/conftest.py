"""Shared fixtures: a session-scoped local Ray, and the offline environment every test runs in."""

from __future__ import annotations

import os

import pytest

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def start_local_ray() -> None:
    from pipelines.ray_env import init_ray

    init_ray(address="", num_cpus=2, object_store_memory=256 * 1024 * 1024)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session, bound to loopback, no dashboard."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()
