"""`capfilt run` and `capfilt export` on S3 that misbehaves: throttling, 5xx, dropped connections and
stalls injected by a proxy (tests/s3_fault_proxy.py) between capfilt and the loopback moto server.

The promises of tests/pipelines/test_s3.py hold under faults: every key once, stats reconcile,
the files byte for byte those of a fault-free run; faults that outlast the retries leave no
marker for a shard whose files are not all complete, and a re-run completes only what is missing.
"""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from capfilt import schema, storage
from capfilt.cli import app
from capfilt.commit import COMMITS
from capfilt.config import load_config
from capfilt.storage import location
from tests.capfilt.capfilt_output import write_output
from tests.conftest import start_local_ray
from tests.pipelines.test_export_pairs import SHARDS as EXPORTED
from tests.pipelines.test_s3 import SETTINGS, output_files
from tests.s3_fault_proxy import FaultProxy, Rule
from tests.tiny_blip import shard_rows, write_shard

SHARDS, ROWS = 2, 8  # whole caption batches per shard: a re-run of one shard batches its rows as the first run did
SEED = 22
# Quick retries, all of them capfilt's (pyarrow's AWS client tries each request once), so a
# request the proxy fails is retried where the test can see it; a stall is 1 s without a byte.
STORAGE = ["storage.attempts=8", "storage.backoff_s=0.01", "storage.max_backoff_s=0.05", "storage.max_total_s=30",
           "storage.request_attempts=1", "storage.request_timeout_s=1"]
# A seeded fifth of all requests fail at random, as a store under load does ...
RANDOM = Rule({"slowdown": 0.08, "internal": 0.05, "reset": 0.05, "delay": 0.02}, delay_s=0.2)


def every_stage(bucket: str, out: str) -> list[Rule]:
    """... and each stage's first requests fail for sure, so every stage meets a fault of a set kind."""
    writes = ("PUT", "POST")
    return [Rule({"reset": 1.0}, methods=("GET",), prefix=f"{bucket}/in/", limit=2),  # input read: cut mid-body
            Rule({"slowdown": 1.0}, methods=writes, prefix=f"{bucket}/{out}/.staging/", limit=2),  # staged parts
            Rule({"internal": 1.0}, methods=writes, prefix=f"{bucket}/{out}/data/", limit=2),  # commit
            Rule({"reset": 1.0}, methods=writes, prefix=f"{bucket}/{out}/{COMMITS}/", limit=2),  # markers: answer lost
            Rule({"delay": 1.0}, methods=writes, prefix=f"{bucket}/{out}/{COMMITS}/", limit=1, delay_s=2.0),  # stall
            Rule({"slowdown": 1.0}, methods=writes, prefix=f"{bucket}/{out}/stats", limit=2),  # stats
            RANDOM]


@pytest.fixture(scope="module")
def proxy(ray_s3):
    """The proxy in front of the S3 server, and the local Ray restarted with it as the S3 endpoint and
    with the quick storage settings in its environment; both put back at the end."""
    import ray

    proxy = FaultProxy(ray_s3.endpoint, seed=SEED)
    saved = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", storage.SETTINGS_ENV)}
    before = storage.settings()
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    storage.configure(load_config(None, STORAGE).storage)
    ray.shutdown()
    start_local_ray()
    yield proxy
    ray.shutdown()
    proxy.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    storage.configure(before)
    start_local_ray()


@pytest.fixture(scope="module")
def bucket(ray_s3, proxy, tmp_path_factory) -> str:
    """A bucket holding the input shards under `in/`."""
    name = ray_s3.bucket()
    local = tmp_path_factory.mktemp("fault-inputs")
    for i in range(SHARDS):
        write_shard(local / f"{i:05d}.parquet", shard_rows(f"f{i}", ROWS, failed=1, corrupt=1, seed=70 + i))
        (location(f"s3://{name}/in") / f"{i:05d}.parquet").write_bytes((local / f"{i:05d}.parquet").read_bytes())
    return name


def run(bucket: str, blip_dirs: dict, out: str):
    args = ["run", "--input", f"s3://{bucket}/in", "--captioner", str(blip_dirs["captioner"]), "--filter",
            str(blip_dirs["filter"]), "--out", f"s3://{bucket}/{out}", "--threshold", "0.5"]
    for item in (*SETTINGS, "run.resources.fuse_models=true", *STORAGE):  # one model pool: quicker
        args += ["--set", item]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def clean(proxy, bucket, blip_dirs) -> dict[str, bytes]:
    """A run through the proxy without faults: the reference output."""
    proxy.rules = []
    result = run(bucket, blip_dirs, "clean")
    assert result.exit_code == 0, result.output
    return output_files(f"s3://{bucket}/clean")


def assert_complete(out: str, reference: dict[str, bytes]) -> None:
    got = output_files(out)
    assert sorted(got) == sorted(reference)
    assert [name for name in reference if got[name] != reference[name]] == []  # byte for byte
    keys = [k for name in sorted(got) for k in (location(out) / name).read_table(columns=["key"])["key"].to_pylist()]
    assert sorted(keys) == sorted(f"f{i}{j:04d}" for i in range(SHARDS) for j in range(ROWS))  # each once
    stats = (location(out) / "stats.json").read_json()
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == SHARDS * ROWS
    assert stats["shards"] == SHARDS
    assert not (location(out) / ".staging").exists()


def test_a_run_through_faults_at_every_stage_writes_what_a_clean_run_writes(proxy, bucket, blip_dirs, clean):
    proxy.reset_counts()
    proxy.rules = every_stage(bucket, "faulty")
    result = run(bucket, blip_dirs, "faulty")
    proxy.rules = []
    assert result.exit_code == 0, result.output
    assert_complete(f"s3://{bucket}/faulty", clean)
    stages = {"in/": "read", "faulty/.staging/": "staging", "faulty/data/": "commit", f"faulty/{COMMITS}/": "markers",
              "faulty/stats": "stats"}
    met = {stage for _, _, key in proxy.injected for prefix, stage in stages.items()
           if key.startswith(f"{bucket}/{prefix}")}
    assert met == set(stages.values())  # every stage met faults ...
    assert all(proxy.counts[kind] > 0 for kind in ("slowdown", "internal", "reset", "delay"))  # ... of every kind
    assert proxy.faults > 10


def test_faults_that_outlast_the_retries_leave_whole_shards_and_a_rerun_redoes_only_the_rest(
        proxy, bucket, blip_dirs, clean):
    out = f"s3://{bucket}/outlast"
    proxy.rules = [Rule({"internal": 1.0}, methods=("PUT", "POST"), prefix=f"{bucket}/outlast/data/00001")]
    result = run(bucket, blip_dirs, "outlast")
    proxy.rules = []
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    # the object, the status and how to go on
    assert errors[0].startswith("error: shard 00001 was not committed: ")
    assert f"PUT {out}/data/00001.parquet failed 8 times" in errors[0]
    assert "INTERNAL_FAILURE" in errors[0] and errors[0].endswith("re-run to retry it")
    markers = sorted(info.base_name for info in (location(out) / COMMITS).files())
    assert markers == ["00000.json"]
    for marker in markers:  # a marker only where all three files are whole
        for dest in schema.OUTPUT_DIRS:
            assert (location(out) / dest / marker.replace(".json", ".parquet")).is_file()

    result = run(bucket, blip_dirs, "outlast")
    assert result.exit_code == 0, result.output
    last = (location(out) / "stats.json").read_json()["last_run"]
    assert last["shards_skipped"] == 1 and last["shards_processed"] == 1
    assert_complete(out, clean)


def test_an_export_through_faults_writes_what_a_clean_export_writes(proxy, bucket, tmp_path):
    proxy.rules = []
    write_output(f"s3://{bucket}/capfilt", tmp_path / "work", EXPORTED)  # a committed output, 12 kept rows

    def export(dest: str):
        return CliRunner().invoke(app, ["export", f"s3://{bucket}/capfilt", "--to", f"s3://{bucket}/{dest}",
                                        "--samples-per-shard", "5", "--set", "export.cpus_per_task=0.5",
                                        *[x for item in STORAGE for x in ("--set", item)]])

    assert (done := export("wds-clean")).exit_code == 0, done.output
    proxy.reset_counts()
    proxy.rules = [Rule({"reset": 1.0}, methods=("GET",), prefix=f"{bucket}/capfilt/data/", limit=2),
                   Rule({"slowdown": 1.0}, methods=("PUT", "POST"), prefix=f"{bucket}/wds-faulty/", limit=3),
                   RANDOM]
    done = export("wds-faulty")
    proxy.rules = []
    assert done.exit_code == 0, done.output
    assert proxy.counts["reset"] >= 2 and proxy.counts["slowdown"] >= 3

    def tars(dest: str) -> dict[str, bytes]:
        root = location(f"s3://{bucket}/{dest}")
        return {info.base_name: root.at(info).read_bytes() for info in root.files(".tar")}

    assert tars("wds-faulty") == tars("wds-clean") and len(tars("wds-clean")) >= 2
    markers = [info.base_name for info in (location(f"s3://{bucket}/wds-faulty") / COMMITS).files()]
    assert len(markers) == len(tars("wds-clean"))
