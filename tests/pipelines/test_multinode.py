"""`capfilt run` on a three-node Ray cluster (one machine, loopback) that loses a worker node mid-run.

The head runs no work (0 CPUs); two worker nodes run every task and actor. Once the first shard
is committed, the node hosting the captioner actor is removed: its actors, its tasks and the
blocks in its object store are gone. The run must either finish or stop with a clear stage
error, and running it again must complete with every input row exactly once.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from capfilt import schema
from capfilt.commit import COMMITS
from capfilt.config import load_config
from capfilt.pipelines.ray_env import loopback_addresses
from capfilt.pipelines.run import StageFailed, run_capfilt
from tests.pipelines.test_faults import without_local_ray
from tests.pipelines.test_ray_env import descendants
from tests.tiny_blip import shard_rows, write_shard

SHARDS, ROWS = 6, 8
REMOVE_TIMEOUT_S = 240


@contextmanager
def loopback_cluster():
    """Head (no CPUs) + two 2-CPU worker nodes, every one of them on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    with loopback_addresses():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def captioner_node(workers: list, timeout_s: float):
    """The worker node whose raylet started the captioner actor's process (read from /proc)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for node in workers:
            raylet = node.all_processes["raylet"][0].process.pid
            for pid in descendants(raylet):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:  # exited meanwhile
                    continue
                if b"MapBatches(CaptionAndFilter)" in title:  # the default: one actor runs both models
                    return node
        time.sleep(0.2)
    return None


def test_a_lost_worker_node_loses_and_duplicates_nothing(blip_dirs, tmp_path):
    inputs = tmp_path / "in"
    for i in range(SHARDS):
        write_shard(inputs / f"{i:05d}.parquet", shard_rows(f"n{i}", ROWS, failed=1, corrupt=0, seed=70 + i))
    out = tmp_path / "out"
    with without_local_ray(), loopback_cluster() as (cluster, workers):
        cfg = load_config(None, [
            f"run.input={inputs}", f"run.caption.model={blip_dirs['captioner']}",
            f"run.filter.model={blip_dirs['filter']}", f"run.resources.address={cluster.address}",
            "run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25", "run.caption.batch_size=2",
            "run.filter.batch_size=2", "run.caption.max_length=6", "run.caption.min_length=2"])
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["stats"] = run_capfilt(cfg, out)
            except Exception as err:  # noqa: BLE001 - checked below: only a StageFailed is acceptable
                outcome["error"] = err

        driver = threading.Thread(target=run)
        driver.start()
        lost = captioner_node(workers, REMOVE_TIMEOUT_S)
        assert lost is not None, f"no captioner actor came up: {outcome}"
        deadline = time.time() + REMOVE_TIMEOUT_S
        while not list((out / COMMITS).glob("*.json")) and driver.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        committed_at_removal = len(list((out / COMMITS).glob("*.json")))
        cluster.remove_node(lost)
        driver.join(timeout=REMOVE_TIMEOUT_S)
        assert not driver.is_alive(), "the run neither finished nor failed after losing a node"
        assert committed_at_removal < SHARDS, "the node was removed only after the run was over"
        if "error" in outcome:  # a clear stage error, naming how to go on
            assert isinstance(outcome["error"], StageFailed), repr(outcome["error"])
            assert "re-run the same command to resume" in str(outcome["error"])
        else:  # finished: whole, and no commit reported lost (a retried commit finds its marker)
            assert outcome["stats"]["read"] == SHARDS * ROWS
            assert outcome["stats"]["last_run"]["shards_uncommitted"] == {}
        with loopback_addresses():
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")  # the node comes back (or a new one)
        stats = run_capfilt(cfg, out)

    assert stats["shards"] == SHARDS
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == SHARDS * ROWS
    keys = [k for dest in schema.OUTPUT_DIRS for p in sorted((out / dest).glob("*.parquet"))
            for k in pq.read_table(p)["key"].to_pylist()]
    assert sorted(keys) == sorted(f"n{i}{j:04d}" for i in range(SHARDS) for j in range(ROWS))
    print(f"\nnode lost after {committed_at_removal} commits; first run: "
          f"{'failed: ' + str(outcome['error'])[:200] if 'error' in outcome else 'finished'}")

