"""capfilt/commit.py: staged parts, per-shard commits with markers, identity, stats from markers."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.commit import (COMMITS, SHARD_STATS, STAGING, CommitError, Commits, ConfigMismatch, Coverage,
                            OutputBusy, OutputLock, commit_shard, end_staging, model_fingerprint, new_staging,
                            run_identity, stage_parts, write_shard)
from capfilt.config import ColumnsConfig, load_config
from capfilt.shards import inspect_shard
from capfilt.storage import location
from tests.tiny_blip import INPUT_SCHEMA, shard_rows, write_shard as write_input

COLUMNS = ColumnsConfig()
OUTPUT_SCHEMA = schema.output_schema(INPUT_SCHEMA)


def scored(rows: list[dict], shard: str) -> pa.Table:
    """Rows as the keep policy leaves them: every third failed, the others kept or rejected in turn."""
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    n = table.num_rows
    errors = ["download: timed out" if i % 3 == 2 else None for i in range(n)]
    texts = [None if errors[i] else ([f"t{i}"] if i % 3 == 0 else []) for i in range(n)]
    added = {
        schema.CAPTION_ITM: pa.array([0.9] * n, pa.float32()), schema.CAPTION_ITC: pa.array([0.1] * n, pa.float32()),
        schema.CAPTION_KEEP: pa.array([bool(t) for t in texts]),
        schema.SYNTHETIC: pa.array([["s"]] * n), schema.SYNTHETIC_ITM: pa.array([[0.2]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_ITC: pa.array([[0.2]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_KEEP: pa.array([[False]] * n), schema.TEXTS: pa.array(texts, pa.list_(pa.string())),
        schema.ERROR: pa.array(errors, pa.string()), schema.ROUND: pa.array([0] * n, pa.int32()),
        schema.CAPTIONER: pa.array(["c"] * n), schema.FILTER: pa.array(["f"] * n),
        schema.THRESHOLD: pa.array([0.5] * n, pa.float32()), schema.KEEP_POLICY: pa.array(["both"] * n),
        schema.SHARD: pa.array([shard] * n), schema.ROW: pa.array(range(n), pa.int64()),
    }
    for name, array in added.items():
        table = table.append_column(name, array)
    return table


@pytest.fixture()
def shard(tmp_path):
    return inspect_shard(write_input(tmp_path / "in" / "00007.parquet", shard_rows("w", 10, failed=0, corrupt=0)),
                         COLUMNS)


def stage(staging, table, slices) -> dict[str, list[int]]:
    """Stage `table`'s rows in the given (start, length) slices; returns part name -> ranges."""
    parts = {}
    for start, length in slices:
        for staged in stage_parts(table.slice(start, length), staging):
            parts[staged["part"]] = staged["ranges"]
    return parts


def test_parts_assemble_into_input_order_once_each(tmp_path, shard):
    out = location(tmp_path / "out")
    staging = new_staging(out)
    table = scored(shard_rows("w", 10, failed=0, corrupt=0), "00007")
    shuffled = table.take([7, 8, 9, 0, 1, 2, 3, 4, 5, 6])  # blocks arrive in any order
    parts = stage(staging, shuffled, [(0, 3), (3, 4), (7, 3), (0, 3)])  # the first block retried: same part again
    assert len(parts) == 3
    coverage = Coverage(10)
    for name, ranges in parts.items():
        assert not coverage.complete
        coverage.add(name, ranges)
    coverage.add(next(iter(parts)), parts[next(iter(parts))])  # counted once
    assert coverage.complete and coverage.covered == 10
    marker = commit_shard(out, staging, shard, list(parts), OUTPUT_SCHEMA, "abc")
    keys = {dest: pq.read_table(tmp_path / "out" / dest / "00007.parquet")["key"].to_pylist()
            for dest in schema.OUTPUT_DIRS}
    assert keys == {"data": ["w0000", "w0003", "w0006", "w0009"], "rejected": ["w0001", "w0004", "w0007"],
                    "failed": ["w0002", "w0005", "w0008"]}
    assert pq.read_table(tmp_path / "out" / "data" / "00007.parquet").schema == OUTPUT_SCHEMA  # no _row, no _shard
    assert marker["counts"]["read"] == 10 and marker["counts"]["failed_by_reason"] == {"download": 3}
    assert marker["input"] == shard.fingerprint() and marker["identity"] == "abc"
    assert json.loads((tmp_path / "out" / COMMITS / "00007.json").read_text()) == marker
    assert not (tmp_path / "out" / STAGING / staging.name / "00007").exists()
    # A retried commit (its node died before it reported) finds the marker; the parts are gone.
    assert commit_shard(out, staging, shard, list(parts), OUTPUT_SCHEMA, "abc") == marker
    with pytest.raises(FileNotFoundError):  # not under another identity: that needs its parts
        commit_shard(out, staging, shard, list(parts), OUTPUT_SCHEMA, "other")
    end_staging(staging)
    assert not (tmp_path / "out" / STAGING).exists()


def test_a_redone_shard_writes_the_same_bytes_however_it_was_split(tmp_path, shard):
    table = scored(shard_rows("w", 10, failed=0, corrupt=0), "00007")
    files = []
    for name, slices in (("a", [(0, 10)]), ("b", [(5, 5), (0, 2), (2, 3)]), ("c", [(0, 6), (4, 6)])):
        out = location(tmp_path / name)
        staging = new_staging(out)
        commit_shard(out, staging, shard, list(stage(staging, table, slices)), OUTPUT_SCHEMA, "abc")
        files.append({d: (tmp_path / name / d / "00007.parquet").read_bytes() for d in schema.OUTPUT_DIRS})
    assert files[0] == files[1] == files[2]


def test_a_shard_with_rows_missing_is_not_committed(tmp_path, shard):
    out = location(tmp_path / "out")
    staging = new_staging(out)
    table = scored(shard_rows("w", 10, failed=0, corrupt=0), "00007")
    parts = stage(staging, table, [(0, 4), (5, 5)])  # row 4 never staged
    with pytest.raises(CommitError, match="9 distinct rows, its footer says 10"):
        commit_shard(out, staging, shard, list(parts), OUTPUT_SCHEMA, "abc")
    assert not (tmp_path / "out" / COMMITS).exists() and not (tmp_path / "out" / "data").exists()


def test_markers_identity_and_fingerprints(tmp_path, monkeypatch):
    path = write_input(tmp_path / "in" / "00000.parquet", shard_rows("m", 2))
    shard = inspect_shard(path, COLUMNS)
    for name in ("c", "f"):  # model folders, as validate() guarantees
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.caption.model=c", "run.filter.model=f"]).run
    out = location(tmp_path / "out")
    commits = Commits(out)
    identity_key = commits.begin(run_identity(cfg))
    table = pa.concat_tables([scored(shard_rows("m", 2), "00000").drop_columns([schema.SHARD, schema.ROW])])
    write_shard(out, shard, table, OUTPUT_SCHEMA, identity_key)
    reloaded = Commits(out)
    assert reloaded.is_committed(shard, identity_key) and not reloaded.is_committed(shard, "another")
    # Batch sizes, pools and the input location do not change results; the keep policy does.
    same = load_config(None, ["run.caption.model=c", "run.filter.model=f", "run.caption.batch_size=7",
                              "run.resources.filter_actors=3", "run.input=elsewhere", "run.caption.eos_check_every=1",
                              "run.caption.cuda_graphs=true", "run.filter.bucket_tokens=0"]).run
    reloaded.check_identity(run_identity(same))
    other = load_config(None, ["run.caption.model=c", "run.filter.model=f", "run.filter.keep=web"]).run
    with pytest.raises(ConfigMismatch, match=r"run\.filter\.keep: was 'both', now 'web'"):
        reloaded.check_identity(run_identity(other))
    os.utime(path, ns=(shard.mtime_ns + 10**9, shard.mtime_ns + 10**9))
    assert not reloaded.is_committed(inspect_shard(path, COLUMNS), identity_key)
    reloaded.forget("00000")
    assert not (tmp_path / "out" / COMMITS / "00000.json").exists()


def test_model_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    before = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"y" * 11)
    assert model_fingerprint(str(tmp_path)) != before
    (tmp_path / "config.json").write_text(json.dumps({"a": 2}))
    assert model_fingerprint(str(tmp_path))["config_sha256"] != before["config_sha256"]


def marker(name: str, kept: int, rejected: int, failed: int, identity: str = "id") -> dict:
    counts = {"read": kept + rejected + failed, "kept": kept, "rejected": rejected, "failed": failed,
              "failed_by_reason": {"download": failed} if failed else {}, "synthetic_generated": 2,
              "synthetic_kept": 1, "web_kept": kept, "texts": kept}
    return {"version": 1, "shard": name, "uri": f"/in/{name}.parquet", "identity": identity,
            "input": {"size": 1, "mtime_ns": 1, "rows": counts["read"]}, "counts": counts}


def test_stats_reconcile_over_markers_of_this_identity(tmp_path):
    out = location(tmp_path)
    for name, counts, identity in (("a", (3, 1, 2), "id"), ("b", (0, 4, 1), "id"), ("old", (9, 9, 9), "old")):
        (out / COMMITS / f"{name}.json").write_json(marker(name, *counts, identity=identity))
    commits = Commits(out)
    stats = commits.stats("id", {"seconds": 1})
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 11
    assert stats["failed_by_reason"] == {"download": 3} and stats["shards"] == 2 and stats["last_run"] == {"seconds": 1}
    commits.write_stats(stats)
    per_shard = {row["shard"]: row for row in pq.read_table(tmp_path / SHARD_STATS).to_pylist()}
    assert per_shard["b"]["rejected"] == 4 and per_shard["a"]["failed_by_reason"] == '{"download": 2}'
    assert per_shard["old"]["identity"] == "old"  # listed (it is a marker), not counted (another identity)


def count_marker_reads(monkeypatch) -> list[str]:
    from capfilt.storage import Location

    reads: list[str] = []
    real = Location.read_json

    def counting(self):
        if f"/{COMMITS}/" in self.path:
            reads.append(self.name)
        return real(self)

    monkeypatch.setattr(Location, "read_json", counting)
    return reads


def test_commit_bookkeeping_holds_at_100000_shards(tmp_path, monkeypatch):
    """Markers, one per shard: committing one more writes one small file and reads none of the others;
    a re-run reads no marker it has counted before."""
    shards = 100_000
    folder = tmp_path / COMMITS
    folder.mkdir()
    started = time.perf_counter()
    template = json.dumps(marker("NAME", 1, 1, 0), sort_keys=True)
    for i in range(shards):  # simulated markers, as commit tasks write them
        (folder / f"{i:06d}.json").write_text(template.replace("NAME", f"{i:06d}"))
    out = location(tmp_path)
    made = time.perf_counter() - started

    reads = count_marker_reads(monkeypatch)
    started = time.perf_counter()
    first = Commits(out)
    stats = first.stats("id", {})
    cold = time.perf_counter() - started
    assert stats["shards"] == shards and stats["read"] == 2 * shards and len(reads) == shards  # each read once
    first.write_stats(stats)

    reads.clear()
    started = time.perf_counter()
    again = Commits(out)
    warm = time.perf_counter() - started
    assert len(again.entries) == shards and reads == []  # all from the previous stats_shards.parquet

    # One more commit: one marker written, no other marker read or rewritten.
    path = write_input(tmp_path / "in" / "new.parquet", shard_rows("n", 3, failed=0, corrupt=0))
    new = inspect_shard(path, COLUMNS)
    before = {p.name: p.stat().st_mtime_ns for p in list(folder.iterdir())[:1000]}
    write_shard(out, new, scored(shard_rows("n", 3, failed=0, corrupt=0), "new").drop_columns(
        [schema.SHARD, schema.ROW]), OUTPUT_SCHEMA, "id")
    assert {p: folder.joinpath(p).stat().st_mtime_ns for p in before} == before
    reads.clear()
    after = Commits(out)
    assert reads == ["new.json"] and len(after.entries) == shards + 1
    print(f"\n{shards} markers: written in {made:.1f} s; listed and aggregated cold {cold:.2f} s, warm (previous "
          f"stats) {warm:.2f} s; {(tmp_path / SHARD_STATS).stat().st_size / 1e6:.1f} MB {SHARD_STATS}")


def test_one_writer_per_local_output_folder(tmp_path):
    out = location(tmp_path)
    with OutputLock(out):
        with pytest.raises(OutputBusy, match="another capfilt run"):
            with OutputLock(out):
                pass
    with OutputLock(out):  # released
        pass
