"""`capfilt run` under faults: actors killed mid-batch, an actor that keeps dying, a driver SIGKILLed.

Faults are real process deaths: the CAPFILT_CHAOS hook (capfilt/stages/common.py) makes a
captioner or filter process `os._exit` in the middle of a batch, and the driver test sends
SIGKILL to a `capfilt run` process. Every test compares the final output, file for file, with an
uninterrupted run of the same command: no row is lost, none is duplicated, none is changed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt import schema
from capfilt.cli import app
from capfilt.stages.common import CHAOS_DIR_ENV, CHAOS_ENV
from tests.pipelines.killed_driver import REPO, kill_when
from tests.pipelines.test_ray_env import assert_loopback_only, descendants
from tests.tiny_blip import shard_rows, write_shard

SHARDS, ROWS = 6, 8
SETTINGS = ["run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25", "run.caption.batch_size=4",
            "run.filter.batch_size=4", "run.caption.max_length=6", "run.caption.min_length=2"]
KILL_TIMEOUT_S = 240  # the driver must have committed a shard by then
EXIT_TIMEOUT_S = 150  # Ray's processes must have followed a killed driver by then


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Six shards of eight rows (one failed download, one corrupt image each)."""
    root = tmp_path_factory.mktemp("fault-inputs")
    for i in range(SHARDS):
        write_shard(root / f"{i:05d}.parquet", shard_rows(f"f{i}", ROWS, failed=1, corrupt=1, seed=10 + i))
    return root


def run_args(inputs: Path, blip_dirs: dict, out: Path, *extra: str) -> list[str]:
    args = ["run", "--input", str(inputs), "--captioner", str(blip_dirs["captioner"]), "--filter",
            str(blip_dirs["filter"]), "--out", str(out), "--num-captions", "2", "--threshold", "0.5"]
    for item in (*SETTINGS, *extra):
        args += ["--set", item]
    return args


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def outputs(out: Path) -> dict[str, object]:
    """Every output file's table, by relative path."""
    return {str(p.relative_to(out)): pq.read_table(p) for dest in schema.OUTPUT_DIRS
            for p in sorted((out / dest).glob("*.parquet"))}


def assert_same_output(out: Path, reference: Path) -> None:
    """Same files with equal tables, and every input key exactly once."""
    got, want = outputs(out), outputs(reference)
    assert sorted(got) == sorted(want)
    changed = [name for name in want if not got[name].equals(want[name])]
    assert not changed, f"output files differ from the uninterrupted run: {changed}"
    keys = [k for table in got.values() for k in table["key"].to_pylist()]
    assert sorted(keys) == sorted(f"f{i}{j:04d}" for i in range(SHARDS) for j in range(ROWS))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == SHARDS * ROWS


@pytest.fixture(scope="module")
def reference(ray_local, inputs, blip_dirs, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one must reproduce."""
    out = tmp_path_factory.mktemp("fault-reference") / "out"
    result = invoke(run_args(inputs, blip_dirs, out))
    assert result.exit_code == 0, result.output
    return out


def chaos(monkeypatch, tmp_path: Path, spec: str) -> Path:
    directory = tmp_path / "chaos"
    directory.mkdir()
    monkeypatch.setenv(CHAOS_ENV, spec)
    monkeypatch.setenv(CHAOS_DIR_ENV, str(directory))
    return directory


def deaths(directory: Path, stage: str) -> list[str]:
    record = directory / f"{stage}.fired"
    return record.read_text().split() if record.exists() else []


def test_actors_killed_mid_batch_lose_and_duplicate_nothing(reference, inputs, blip_dirs, tmp_path, monkeypatch):
    fired = chaos(monkeypatch, tmp_path, "caption:2,filter:3")
    out = tmp_path / "out"
    result = invoke(run_args(inputs, blip_dirs, out))
    assert result.exit_code == 0, result.output
    # Each fault fired exactly once (a restarted actor does not fire it again) ...
    assert len(deaths(fired, "caption")) == 1 and len(deaths(fired, "filter")) == 1
    # ... and the retried batches gave the output an uninterrupted run gives.
    assert_same_output(out, reference)


def test_an_actor_that_keeps_dying_fails_clearly_and_a_rerun_resumes(reference, inputs, blip_dirs, tmp_path,
                                                                     monkeypatch):
    fired = chaos(monkeypatch, tmp_path, "caption:3:always")  # every captioner process dies on its 3rd batch
    out = tmp_path / "out"
    args = run_args(inputs, blip_dirs, out, "run.resources.max_actor_restarts=1")
    result = invoke(args)
    assert result.exit_code == 1, result.output
    assert "the captioner+filter actor kept dying" in result.output  # both models in one actor (the default)
    assert "run.resources.max_actor_restarts=1" in result.output
    assert len(deaths(fired, "caption")) == 2  # the first process and its one restart, then the job stops
    committed = int(re.search(r"(\d+) of \d+ shards were committed", result.output).group(1))
    assert committed_shards(out) == committed  # what the message reports is what stays committed

    monkeypatch.delenv(CHAOS_ENV)
    again = invoke(args)
    assert again.exit_code == 0, again.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["last_run"]["shards_skipped"] == committed
    assert_same_output(out, reference)


@contextmanager
def without_local_ray():
    """Stop the suite's in-process Ray while another Ray runs on this host (see test_cluster.py)."""
    import ray

    from tests.conftest import start_local_ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    try:
        yield
    finally:
        if was_up:
            start_local_ray()


def committed_shards(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json")))


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def test_a_driver_killed_mid_run_resumes_to_the_same_output(reference, inputs, blip_dirs, tmp_path):
    out = tmp_path / "out"
    args = run_args(inputs, blip_dirs, out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop(CHAOS_ENV, None)
    ray_pids: set[int] = set()
    try:
        def look(pid: int) -> None:
            ray_pids.update(descendants(pid) - {pid})
            # The Ray this command started listens on loopback only (no exposed control plane).
            assert_loopback_only(pid)

        with without_local_ray():
            kill_when(args, lambda: committed_shards(out) > 0, tmp_path / "driver.log", KILL_TIMEOUT_S, env=env,
                      before_kill=look)
            killed_at = time.time()
            at_kill = committed_shards(out)
            assert 0 < at_kill < SHARDS, f"kill came at {at_kill} of {SHARDS} committed shards:\n" + \
                (tmp_path / "driver.log").read_text()[-3000:]

        result = invoke(args)  # the same command again, while the dead run's processes wind down
        assert result.exit_code == 0, result.output
        last = json.loads((out / "stats.json").read_text())["last_run"]
        # Commit tasks run on workers, so one already running may still land after the driver died:
        # the re-run skips every shard committed by then and redoes the rest.
        assert at_kill <= last["shards_skipped"] < SHARDS
        assert last["shards_processed"] == SHARDS - last["shards_skipped"]
        assert_same_output(out, reference)
        # The local Ray shares the driver's fate: its processes exit without `ray stop` (GCS,
        # raylet and workers at once; Ray's agents after their last call to the dead GCS times out).
        while alive(ray_pids) and time.time() < killed_at + EXIT_TIMEOUT_S:
            time.sleep(0.5)
        assert not alive(ray_pids), f"Ray processes outlived the killed driver: {alive(ray_pids)}"
    finally:
        for pid in alive(ray_pids):  # only processes this test's driver started
            os.kill(pid, signal.SIGKILL)
