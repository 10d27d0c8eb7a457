"""Shard listing and schema checks, per-shard atomic writers, manifest identity, stats."""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.config import ColumnsConfig, RunConfig, load_config
from capfilt.io import (ConfigMismatch, Manifest, OutputLock, ShardWriter, aggregate_stats, inspect_shard,
                        iter_failed_shard, list_shards, model_fingerprint, run_identity, unify)
from tests.tiny_blip import INPUT_SCHEMA, shard_rows, write_shard

COLUMNS = ColumnsConfig()


def test_list_shards_from_a_directory_or_a_glob(tmp_path):
    for name in ("00001.parquet", "00000.parquet"):
        write_shard(tmp_path / name, [])
    (tmp_path / "00000_stats.json").write_text("{}")
    assert [p.name for p in list_shards(str(tmp_path))] == ["00000.parquet", "00001.parquet"]
    assert [p.name for p in list_shards(str(tmp_path / "*1.parquet"))] == ["00001.parquet"]
    with pytest.raises(FileNotFoundError, match="no parquet shards match"):
        list_shards(str(tmp_path / "nothing*"))


def test_list_shards_refuses_two_shards_with_one_output_name(tmp_path):
    write_shard(tmp_path / "web" / "00000.parquet", [])
    write_shard(tmp_path / "human" / "00000.parquet", [])
    with pytest.raises(ValueError, match="same output name '00000'"):
        list_shards(str(tmp_path / "*" / "*.parquet"))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["jpg"]), r"column 'jpg' \(run.columns.image\) is missing"),
    (lambda t: t.drop_columns(["caption"]), r"column 'caption' \(run.columns.text\) is missing"),
    (lambda t: t.set_column(0, "key", pa.array(range(t.num_rows))), r"'key' \(run.columns.key\) has type int64"),
    (lambda t: t.append_column("texts", pa.array([["x"]] * t.num_rows)), "collide with columns CapFilt writes"),
    (lambda t: t.append_column("path", pa.array(["p"] * t.num_rows)), "'path' is reserved"),
])
def test_schema_problems_name_the_column_and_key(tmp_path, change, message):
    table = change(pa.Table.from_pylist(shard_rows("a", 3), schema=INPUT_SCHEMA))
    pq.write_table(table, tmp_path / "s.parquet")
    shard = inspect_shard(tmp_path / "s.parquet", COLUMNS)
    assert shard.rows == 3
    assert shard.problem is not None and shard.problem.startswith("schema: ")
    assert re.search(message, shard.problem), shard.problem


def test_custom_column_names_and_unreadable_shards(tmp_path):
    table = pa.Table.from_pylist(shard_rows("a", 3), schema=INPUT_SCHEMA).rename_columns(
        ["id" if n == "key" else "image" if n == "jpg" else n for n in INPUT_SCHEMA.names])
    pq.write_table(table, tmp_path / "renamed.parquet")
    assert inspect_shard(tmp_path / "renamed.parquet", COLUMNS).problem is not None
    assert inspect_shard(tmp_path / "renamed.parquet", ColumnsConfig(key="id", image="image")).problem is None
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    junk = inspect_shard(tmp_path / "junk.parquet", COLUMNS)
    assert junk.schema is None and junk.rows == -1 and junk.problem.startswith("unreadable: ")


def test_unify_keeps_extra_columns_and_fails_a_conflicting_shard(tmp_path):
    base = pa.Table.from_pylist(shard_rows("a", 2), schema=INPUT_SCHEMA)
    pq.write_table(base.append_column("extra", pa.array(["e", "f"])), tmp_path / "0.parquet")
    pq.write_table(base, tmp_path / "1.parquet")
    pq.write_table(base.append_column("extra", pa.array([1.5, 2.5])), tmp_path / "2.parquet")
    shards = [inspect_shard(tmp_path / f"{i}.parquet", COLUMNS) for i in range(3)]
    unified, shards = unify(shards)
    assert unified.field("extra").type == pa.string()
    assert [s.problem is None for s in shards] == [True, True, False]
    assert "conflicts with the other shards" in shards[2].problem


def shard_and_writer(tmp_path, rows):
    path = write_shard(tmp_path / "in" / "00007.parquet", rows)
    shard = inspect_shard(path, COLUMNS)
    return shard, ShardWriter(tmp_path / "out", shard, schema.output_schema(INPUT_SCHEMA))


def scored(rows: list[dict], texts: list[list[str] | None], errors: list[str | None]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    n = table.num_rows
    added = {
        schema.CAPTION_ITM: pa.array([0.9] * n, pa.float32()), schema.CAPTION_ITC: pa.array([0.1] * n, pa.float32()),
        schema.CAPTION_KEEP: pa.array([bool(t) for t in texts]),
        schema.SYNTHETIC: pa.array([["s"]] * n), schema.SYNTHETIC_ITM: pa.array([[0.2]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_ITC: pa.array([[0.2]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_KEEP: pa.array([[False]] * n), schema.TEXTS: pa.array(texts, pa.list_(pa.string())),
        schema.ERROR: pa.array(errors, pa.string()), schema.ROUND: pa.array([0] * n, pa.int32()),
        schema.CAPTIONER: pa.array(["c"] * n), schema.FILTER: pa.array(["f"] * n),
        schema.THRESHOLD: pa.array([0.5] * n, pa.float32()), schema.KEEP_POLICY: pa.array(["both"] * n),
    }
    for name, array in added.items():
        table = table.append_column(name, array)
    return table


def test_writer_commits_atomically_only_when_complete(tmp_path):
    rows = shard_rows("w", 4, failed=1, corrupt=0)
    shard, writer = shard_and_writer(tmp_path, rows)
    table = scored(rows, [["a photo"], [], ["x"], None], [None, None, None, "download: timed out"])
    writer.write(schema.DATA, table.slice(0, 1))
    with pytest.raises(RuntimeError, match="1 of 4 rows written"):
        writer.commit()
    assert not (tmp_path / "out" / "data").exists()  # nothing visible before the commit
    writer.write(schema.REJECTED, table.slice(1, 1))
    writer.write(schema.DATA, table.slice(2, 1))
    writer.write(schema.FAILED, table.slice(3, 1))
    entry = writer.commit()
    assert entry["counts"]["read"] == 4 and entry["counts"]["kept"] == 2
    assert entry["counts"]["failed_by_reason"] == {"download": 1} and entry["input"] == shard.fingerprint()
    for dest, keys in ((schema.DATA, ["w0000", "w0002"]), (schema.REJECTED, ["w0001"]), (schema.FAILED, ["w0003"])):
        assert pq.read_table(tmp_path / "out" / dest / "00007.parquet")["key"].to_pylist() == keys
    assert list((tmp_path / "out" / ".tmp").iterdir()) == []


def test_writer_abort_leaves_nothing(tmp_path):
    rows = shard_rows("w", 3000, failed=0, corrupt=0)  # over a row group: a temp file exists
    _, writer = shard_and_writer(tmp_path, rows)
    writer.write(schema.DATA, scored(rows, [["t"]] * 3000, [None] * 3000))
    assert list((tmp_path / "out" / ".tmp").iterdir())
    writer.abort()
    assert list((tmp_path / "out" / ".tmp").iterdir()) == []


def test_a_failed_shard_keeps_its_rows_with_the_reason(tmp_path):
    table = pa.Table.from_pylist(shard_rows("f", 3), schema=INPUT_SCHEMA).drop_columns(["jpg"])
    pq.write_table(table, tmp_path / "s.parquet")
    shard = inspect_shard(tmp_path / "s.parquet", COLUMNS)
    out = pa.concat_tables(iter_failed_shard(shard, RunConfig()))
    assert out["key"].to_pylist() == ["f0000", "f0001", "f0002"]
    assert set(out[schema.ERROR].to_pylist()) == {shard.problem}
    assert out[schema.TEXTS].null_count == 3 and "jpg" not in out.column_names


def test_manifest_identity_and_fingerprints(tmp_path, monkeypatch):
    path = write_shard(tmp_path / "in" / "00000.parquet", shard_rows("m", 2))
    shard = inspect_shard(path, COLUMNS)
    for name in ("c", "f"):  # model folders, as validate() guarantees
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.caption.model=c", "run.filter.model=f"]).run
    manifest = Manifest(tmp_path / "out")
    manifest.record(shard.name, {"input": shard.fingerprint(), "counts": {}}, run_identity(cfg))
    reloaded = Manifest(tmp_path / "out")
    assert reloaded.is_committed(shard)
    # Batch sizes, pools and the input location do not change results; the threshold does.
    same = load_config(None, ["run.caption.model=c", "run.filter.model=f", "run.caption.batch_size=7",
                              "run.resources.filter_actors=3", "run.input=elsewhere"]).run
    reloaded.check_identity(run_identity(same))
    other = load_config(None, ["run.caption.model=c", "run.filter.model=f", "run.filter.keep=web"]).run
    with pytest.raises(ConfigMismatch, match=r"run\.filter\.keep: committed 'both', now 'web'"):
        reloaded.check_identity(run_identity(other))
    os.utime(path, ns=(shard.mtime_ns + 10**9, shard.mtime_ns + 10**9))
    assert not reloaded.is_committed(inspect_shard(path, COLUMNS))


def test_model_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    before = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"y" * 11)
    assert model_fingerprint(str(tmp_path)) != before
    (tmp_path / "config.json").write_text(json.dumps({"a": 2}))
    assert model_fingerprint(str(tmp_path))["config_sha256"] != before["config_sha256"]


def test_stats_reconcile_over_shards(tmp_path):
    manifest = Manifest(tmp_path)
    for name, (kept, rejected, failed) in {"a": (3, 1, 2), "b": (0, 4, 1)}.items():
        counts = {"read": kept + rejected + failed, "kept": kept, "rejected": rejected, "failed": failed,
                  "failed_by_reason": {"download": failed}, "synthetic_generated": 2, "synthetic_kept": 1,
                  "web_kept": kept, "texts": kept}
        manifest.shards[name] = {"counts": counts}
    stats = aggregate_stats(manifest, {"seconds": 1})
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 11
    assert stats["failed_by_reason"] == {"download": 3} and stats["shards"] == 2
    assert stats["per_shard"]["b"]["rejected"] == 4 and stats["last_run"] == {"seconds": 1}


def test_one_writer_per_output_directory(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(RuntimeError, match="another capfilt run"):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path):  # released
        pass
