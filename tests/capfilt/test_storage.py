"""capfilt/storage.py: one interface for local folders and object stores (a real S3 API server here)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from capfilt import storage
from capfilt.config import StorageConfig
from capfilt.storage import Location, glob_files, location
from tests.s3_fault_proxy import Rule


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An empty folder: a local one, and a bucket prefix on the loopback S3 server."""
    if request.param == "local":
        return location(tmp_path / "root")
    server = request.getfixturevalue("s3")
    return location(f"s3://{server.bucket()}/root")


def test_paths_and_uris_parse_to_filesystems(tmp_path, monkeypatch, s3):
    monkeypatch.chdir(tmp_path)
    assert location("rel/dir").path == str(tmp_path / "rel" / "dir") and location("rel/dir").local
    assert location(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    bucket = s3.bucket()
    remote = location(f"s3://{bucket}/a/b/")
    assert remote.fs.type_name == "s3" and remote.path == f"{bucket}/a/b" and not remote.local
    assert str(remote) == f"s3://{bucket}/a/b" and str(remote / "c.json") == f"s3://{bucket}/a/b/c.json"
    assert str(remote.parent) == f"s3://{bucket}/a" and (remote / "c.json").name == "c.json"
    # A pickled location is rebuilt from its URI where it lands (no filesystem object travels).
    assert pickle.loads(pickle.dumps(remote)) == remote
    with pytest.raises(ValueError, match="needs a bucket"):
        location("s3:///nothing")
    with pytest.raises(ValueError, match="no filesystem for this URI"):
        location("nosuchscheme://host/x")


def test_writes_are_whole_or_absent(root):
    target = root / "sub" / "f.bin"
    target.write_bytes(b"first")
    assert target.read_bytes() == b"first" and target.is_file()

    def fails_midway(sink):
        sink.write(b"half of a new")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        target.write_with(fails_midway)
    assert target.read_bytes() == b"first"  # the old file stands, the cut write left nothing
    assert [f.base_name for f in (root / "sub").files()] == ["f.bin"]  # no temporary file either
    fresh = root / "never.bin"
    with pytest.raises(RuntimeError):
        fresh.write_with(fails_midway)
    assert not fresh.exists()


def test_listing_globbing_and_deleting(root):
    for name in ("b/2.parquet", "a/1.parquet", "a/x.json", "a/deeper/3.parquet", "0.parquet"):
        (root / name).write_bytes(b"x")
    assert [f.base_name for f in (root / "a").files(".parquet")] == ["1.parquet"]
    assert (root / "a").is_dir() and not (root / "nothing").exists() and (root / "nothing").files() == []
    assert [str(loc) for loc in glob_files(f"{root}/*/*.parquet")] == [f"{root}/a/1.parquet", f"{root}/b/2.parquet"]
    assert [loc.name for loc in glob_files(f"{root}/a/[1-3].parquet")] == ["1.parquet"]
    assert glob_files(f"{root}/c/*.parquet") == []
    (root / "a").delete()
    assert not (root / "a" / "1.parquet").exists() and (root / "b" / "2.parquet").exists()
    (root / "b" / "2.parquet").delete()
    (root / "missing").delete()  # nothing to delete is no error


def test_tables_and_json_round_trip(root):
    import pyarrow.parquet as pq

    table = pa.table({"a": [1, 2, 3]})
    (root / "t.parquet").write_with(lambda sink: pq.write_table(table, sink))
    assert (root / "t.parquet").read_table().equals(table)
    (root / "m.json").write_json({"b": [1, 2]})
    assert (root / "m.json").read_json() == {"b": [1, 2]}


FAST = StorageConfig(attempts=4, backoff_s=0.01, max_backoff_s=0.02, max_total_s=20.0, request_attempts=1,
                     request_timeout_s=1.0)  # quick retries, and capfilt's alone (the AWS client tries once)


@pytest.fixture()
def fast_retries():
    saved = storage.settings()
    storage.configure(FAST)
    yield FAST
    storage.configure(saved)


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset", "delay"])
def test_transient_faults_are_retried_on_every_operation(fault_proxy, fast_retries, s3, kind):
    import pyarrow.parquet as pq

    root = location(f"s3://{s3.bucket()}/r")
    table = pa.table({"a": list(range(1000))})
    # every operation's first try fails (a delay outlasts storage.request_timeout_s: a stall)
    fault_proxy.rules = [Rule({kind: 1.0}, limit=1, delay_s=2.5)]
    (root / "t.parquet").write_table(table)
    assert fault_proxy.counts[kind] == 1
    for operation in (lambda: (root / "t.parquet").read_table(), lambda: (root / "t.parquet").read_bytes(),
                      lambda: root.files(), lambda: (root / "t.parquet").info(),
                      lambda: pq.ParquetFile((root / "t.parquet").open_input_file()).read()):
        fault_proxy.rules = [Rule({kind: 1.0}, limit=1, delay_s=2.5)]
        operation()
        assert fault_proxy.counts[kind] >= 2 and fault_proxy.rules[0].injected == 1
    assert (root / "t.parquet").read_table().equals(table)
    assert [f.base_name for f in root.files()] == ["t.parquet"]


def test_a_4xx_is_never_retried(fault_proxy, fast_retries, s3):
    target = location(f"s3://{s3.bucket()}/r/x.bin")
    fault_proxy.rules = [Rule({"forbidden": 1.0})]
    with pytest.raises(OSError, match="ACCESS_DENIED") as raised:
        target.write_bytes(b"x")
    assert not isinstance(raised.value, storage.StorageUnavailable)
    assert fault_proxy.counts["requests"] == 1  # one try, no retry


def test_faults_that_outlast_the_retries_name_the_object_and_the_status(fault_proxy, fast_retries, s3):
    target = location(f"s3://{s3.bucket()}/r/x.bin")
    fault_proxy.rules = [Rule({"slowdown": 1.0}, methods=("PUT", "POST"))]
    expected = rf"PUT {target} failed 4 times .*SLOW_DOWN.*storage.attempts=4"
    with pytest.raises(storage.StorageUnavailable, match=expected):
        target.write_bytes(b"x")
    assert fault_proxy.counts["slowdown"] == FAST.attempts  # bounded: attempts x request_attempts (1)
    fault_proxy.rules = []
    assert not target.exists()  # nothing half-written
    target.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_retries_stop_at_the_total_time(fault_proxy, s3):
    saved = storage.settings()
    storage.configure(StorageConfig(attempts=100, backoff_s=0.2, max_backoff_s=0.2, max_total_s=0.5,
                                    request_attempts=1))
    try:
        fault_proxy.rules = [Rule({"internal": 1.0})]
        with pytest.raises(storage.StorageUnavailable, match="INTERNAL_FAILURE|HTTP status 500"):
            location(f"s3://{s3.bucket()}/r/x.bin").read_bytes()
        assert fault_proxy.counts["internal"] < 10
    finally:
        storage.configure(saved)


def test_settings_travel_in_the_environment(monkeypatch):
    saved = storage.settings()
    storage.configure(FAST)
    try:
        import json
        import os

        assert StorageConfig(**json.loads(os.environ[storage.SETTINGS_ENV])) == FAST
    finally:
        storage.configure(saved)


def test_a_delete_whose_answer_was_lost_is_done(fault_proxy, fast_retries, s3):
    folder = location(f"s3://{s3.bucket()}/r/d")
    for name in ("a.bin", "b.bin"):
        (folder / name).write_bytes(b"x")
    (folder.parent / "keep.bin").write_bytes(b"k")
    # the store deletes, the answer is cut: the retry finds nothing to delete, which is success
    fault_proxy.rules = [Rule({"reset": 1.0}, methods=("DELETE", "POST"), limit=1)]
    folder.delete()
    assert fault_proxy.counts["reset"] == 1
    assert not folder.exists() and (folder.parent / "keep.bin").read_bytes() == b"k"
    fault_proxy.rules = [Rule({"reset": 1.0}, methods=("DELETE",), limit=1)]
    (folder.parent / "keep.bin").delete()
    assert fault_proxy.counts["reset"] == 2 and not (folder.parent / "keep.bin").exists()
