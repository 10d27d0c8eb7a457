"""`capfilt run` with its input and output on object storage: a real S3 API server on loopback (moto).

The same contract as on local folders (tests/pipelines/test_run.py, test_faults.py): every key
once, stats reconcile, a re-run does no model work, a driver SIGKILLed mid-run resumes to the same
files; and the files on S3 are byte for byte the ones a local run writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capfilt import schema
from capfilt.cli import app
from capfilt.commit import COMMITS
from capfilt.config import load_config
from capfilt.pipelines.run import run_capfilt
from capfilt.storage import location
from tests.pipelines.killed_driver import kill_when
from tests.pipelines.test_faults import without_local_ray
from tests.tiny_blip import shard_rows, write_shard

SHARDS, ROWS = 5, 8
SETTINGS = ["run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25", "run.caption.batch_size=4",
            "run.filter.batch_size=4", "run.caption.max_length=6", "run.caption.min_length=2",
            "run.caption.num_captions=2"]
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3-inputs")
    for i in range(SHARDS):
        write_shard(root / f"{i:05d}.parquet", shard_rows(f"s{i}", ROWS, failed=1, corrupt=1, seed=30 + i))
    return root


@pytest.fixture(scope="module")
def bucket(ray_s3, local_inputs) -> str:
    """A bucket holding the input shards under `in/`."""
    name = ray_s3.bucket()
    for path in sorted(local_inputs.glob("*.parquet")):
        (location(f"s3://{name}/in") / path.name).write_bytes(path.read_bytes())
    return name


def run_args(inputs: str, blip_dirs: dict, out: str) -> list[str]:
    args = ["run", "--input", inputs, "--captioner", str(blip_dirs["captioner"]), "--filter",
            str(blip_dirs["filter"]), "--out", out, "--threshold", "0.5"]
    for item in SETTINGS:
        args += ["--set", item]
    return args


def output_files(out: str) -> dict[str, bytes]:
    """Every output parquet file's bytes, by folder/name."""
    root = location(out)
    return {f"{dest}/{info.base_name}": root.at(info).read_bytes()
            for dest in schema.OUTPUT_DIRS for info in (root / dest).files(".parquet")}


@pytest.fixture(scope="module")
def local_reference(ray_s3, local_inputs, blip_dirs, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("s3-reference") / "out"
    result = CliRunner().invoke(app, run_args(str(local_inputs), blip_dirs, str(out)))
    assert result.exit_code == 0, result.output
    return output_files(str(out))


@pytest.fixture(scope="module")
def s3_run(bucket, blip_dirs) -> str:
    out = f"s3://{bucket}/out"
    result = CliRunner().invoke(app, run_args(f"s3://{bucket}/in/*.parquet", blip_dirs, out))
    assert result.exit_code == 0, result.output
    assert "read 40" in result.output
    return out


def assert_complete(out: str, reference: dict[str, bytes]) -> None:
    got = output_files(out)
    assert sorted(got) == sorted(reference)
    assert [name for name in reference if got[name] != reference[name]] == []  # byte for byte
    keys = [k for name in sorted(got) for k in (location(out) / name).read_table(columns=["key"])["key"].to_pylist()]
    assert sorted(keys) == sorted(f"s{i}{j:04d}" for i in range(SHARDS) for j in range(ROWS))
    stats = (location(out) / "stats.json").read_json()
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == SHARDS * ROWS
    assert stats["failed_by_reason"] == {"decode": SHARDS, "download": SHARDS}


def test_an_s3_run_writes_what_a_local_run_writes(s3_run, local_reference):
    assert_complete(s3_run, local_reference)
    root = location(s3_run)
    assert sorted(info.base_name for info in (root / COMMITS).files()) == [f"{i:05d}.json" for i in range(SHARDS)]
    assert (root / "config.yaml").is_file() and (root / "stats_shards.parquet").is_file()
    assert not (root / ".staging").exists()  # staged parts are gone once their shards commit


def test_an_s3_rerun_does_no_model_work(s3_run, bucket, blip_dirs, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a rerun over committed shards must not start Ray or build the pipeline")

    monkeypatch.setattr("capfilt.pipelines.run.build_dataset", forbidden)
    monkeypatch.setattr("capfilt.pipelines.run.start_ray", forbidden)
    markers = {info.base_name: info.mtime_ns for info in (location(s3_run) / COMMITS).files()}
    cfg = load_config(None, [f"run.input=s3://{bucket}/in", f"run.caption.model={blip_dirs['captioner']}",
                             f"run.filter.model={blip_dirs['filter']}", "run.filter.threshold=0.5", *SETTINGS])
    stats = run_capfilt(cfg, s3_run)
    assert stats["last_run"]["pipeline_started"] is False and stats["last_run"]["shards_skipped"] == SHARDS
    assert {info.base_name: info.mtime_ns for info in (location(s3_run) / COMMITS).files()} == markers


def test_a_driver_killed_mid_run_on_s3_resumes_to_the_same_files(bucket, blip_dirs, local_reference, tmp_path):
    out = f"s3://{bucket}/killed"
    args = run_args(f"s3://{bucket}/in", blip_dirs, out)
    env = dict(os.environ)  # the S3 endpoint and keys, as the user's shell would have them
    commits = location(out) / COMMITS
    with without_local_ray():
        kill_when(args, lambda: bool(commits.files()), tmp_path / "driver.log", KILL_TIMEOUT_S, env=env)
        at_kill = len(commits.files())
        assert 0 < at_kill < SHARDS, f"kill came at {at_kill} of {SHARDS} committed shards:\n" + \
            (tmp_path / "driver.log").read_text()[-3000:]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    last = (location(out) / "stats.json").read_json()["last_run"]
    assert at_kill <= last["shards_skipped"] < SHARDS  # a commit task running at the kill may still land
    assert last["shards_processed"] == SHARDS - last["shards_skipped"]
    assert_complete(out, local_reference)
    assert json.loads((commits / "00000.json").read_bytes())["shard"] == "00000"
