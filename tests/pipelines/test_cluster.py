"""`capfilt run --address auto` submitted to a real Ray cluster through the Jobs API (docs/cluster.md).

The cluster is `ray start --head --block` in its own process group, with token authentication and
the dashboard on 127.0.0.1. It is stopped by signalling that process (which stops what it
started), not with `ray stop`: `ray stop` kills every Ray process on the machine, including other
Ray sessions that are not this test's.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt import schema
from tests.tiny_blip import shard_rows, write_shard

START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def cluster():
    """A one-node Ray cluster with a dashboard on loopback; yields (dashboard URL, auth headers).

    The suite's in-process Ray (`ray_local`) is shut down for the cluster's lifetime and started
    again afterwards: with both on one host, later GCS calls of the in-process driver hung
    (seen in `ray.cluster_resources()` under Ray 2.60).
    """
    import ray

    from tests.conftest import start_local_ray

    local_was_up = ray.is_initialized()
    if local_was_up:
        ray.shutdown()
    temp = Path(tempfile.mkdtemp(prefix="capfilt-ray-", dir="/tmp"))  # short: Ray's socket paths
    token_file = temp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    dashboard_port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    command = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "true", "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2", "--num-gpus", "0",
               "--temp-dir", str(temp), "--disable-usage-stats"]
    # No 30 s drain on SIGTERM: there is nothing to drain once the job is over.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        yield url, {"Authorization": f"Bearer {token_file.read_text()}"}, temp
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this test created, nothing else
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if local_was_up:
            start_local_ray()


def connect(url: str, headers: dict):
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            client = JobSubmissionClient(url, headers=headers)
            client.list_jobs()
            return client
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_capfilt_run_as_a_ray_job(cluster, blip_dirs, tmp_path):
    from ray.job_submission import JobStatus

    url, headers, temp = cluster
    write_shard(tmp_path / "in" / "00000.parquet", shard_rows("j", 6, failed=1, corrupt=0))
    out = tmp_path / "out"
    entrypoint = shlex.join([
        sys.executable, "-m", "capfilt.cli", "run", "--address", "auto", "--input", str(tmp_path / "in"),
        "--captioner", str(blip_dirs["captioner"]), "--filter", str(blip_dirs["filter"]), "--out", str(out),
        "--set", "run.resources.cpus_per_actor=0.5", "--set", "run.resources.decode_cpus=0.25",
        "--set", "run.caption.max_length=5", "--set", "run.caption.min_length=2",
    ])
    client = connect(url, headers)
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    deadline = time.time() + JOB_TIMEOUT_S
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        client.stop_job(job)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-4000:]}"
    assert "read 6" in logs

    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 6
    assert stats["failed_by_reason"] == {"download": 1}
    keys = sorted(k for dest in schema.OUTPUT_DIRS
                  for k in pq.read_table(out / dest / "00000.parquet")["key"].to_pylist())
    assert keys == [f"j{i:04d}" for i in range(6)]
    assert (out / "config.yaml").is_file() and (out / "_commits" / "00000.json").is_file()
