"""Shared fixtures: the offline environment every test runs in, tiny random BLIP directories, a
session-scoped local Ray, a local S3 server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Weight digests (capfilt/digests.py) cached for this session only, not in the user's home; the
# folder goes when the session ends (Ray workers inherit the variable, so it is set at import).
if "CAPFILT_CACHE" not in os.environ:
    os.environ["CAPFILT_CACHE"] = tempfile.mkdtemp(prefix="capfilt-cache-")
    atexit.register(shutil.rmtree, os.environ["CAPFILT_CACHE"], True)


@pytest.fixture(scope="session")
def blip_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"captioner": dir, "filter": dir}: tiny random BLIPs saved with safetensors."""
    from tests.tiny_blip import save_captioner, save_filter

    root = tmp_path_factory.mktemp("blip")
    return {"captioner": save_captioner(root / "captioner"), "filter": save_filter(root / "filter")}


@pytest.fixture(scope="session")
def published_blip_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"captioner": dir, "filter": dir}: tiny random BLIPs in the published Salesforce folder layout."""
    from tests.tiny_blip import save_published_captioner, save_published_filter

    root = tmp_path_factory.mktemp("published")
    return {"captioner": save_published_captioner(root / "captioner"),
            "filter": save_published_filter(root / "filter", seed=1)}


def start_local_ray() -> None:
    from capfilt.pipelines.ray_env import init_ray

    init_ray(address="", num_cpus=2, object_store_memory=256 * 1024 * 1024)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session, bound to loopback, no dashboard."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture()
def ray_restarted_after(ray_local):
    """`ray_local`, shut down and started afresh after the test.

    After a Ray Train run in this driver, its next GCS query (Ray Data's first
    `ray.cluster_resources()`) was seen to hang forever under Ray 2.60, in the full suite on 2
    loaded cores; a fresh in-process Ray for the tests that follow avoids it.
    """
    yield ray_local
    ray_local.shutdown()
    start_local_ray()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback, its endpoint and keys in this process's environment.

    The environment stays set for the rest of the session (pyarrow and boto read it at each
    client they build); the server is stopped, by its pid, at the end.
    """
    from tests.s3_server import S3Server

    server = S3Server()
    saved = {name: os.environ.get(name) for name in server.environment()}
    os.environ.update(server.environment())
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def ray_s3(s3, ray_local):
    """`ray_local` restarted inside the S3 environment, so its workers reach the server as the driver does."""
    ray_local.shutdown()
    start_local_ray()
    yield s3


@pytest.fixture()
def fault_proxy(s3, monkeypatch):
    """A fault-injecting proxy (tests/s3_fault_proxy.py) in front of `s3`, this process's S3 endpoint
    pointing at it; no faults until the test sets its rules. Stopped at the end."""
    from capfilt import storage
    from tests.s3_fault_proxy import FaultProxy

    proxy = FaultProxy(s3.endpoint, seed=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage.configure(storage.settings())  # S3 clients are rebuilt from the environment
    yield proxy
    proxy.stop()
    monkeypatch.undo()
    storage.configure(storage.settings())
