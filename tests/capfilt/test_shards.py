"""capfilt/shards.py: listing input shards on any filesystem, footers, schema checks, read units."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.config import ColumnsConfig
from capfilt.shards import inspect_shard, inspect_shards, list_shards, read_columns, read_unit, read_units, unify
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
    (lambda t: t.append_column("_row", pa.array(range(t.num_rows))), "'_row' is reserved"),
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


def test_shards_list_and_inspect_the_same_on_s3(s3, tmp_path):
    import boto3

    bucket = s3.bucket()
    client = boto3.client("s3")
    for name in ("00001.parquet", "00000.parquet", "00000_stats.json"):
        path = write_shard(tmp_path / name, shard_rows("s", 3)) if name.endswith(".parquet") else None
        client.put_object(Bucket=bucket, Key=f"web/{name}", Body=path.read_bytes() if path else b"{}")
    found = list_shards(f"s3://{bucket}/web")
    assert [str(loc) for loc in found] == [f"s3://{bucket}/web/0000{i}.parquet" for i in range(2)]
    assert [loc.name for loc in list_shards(f"s3://{bucket}/*/00001.parquet")] == ["00001.parquet"]
    local = inspect_shard(tmp_path / "00000.parquet", COLUMNS)
    remote, _ = inspect_shards(found, COLUMNS)
    assert (remote.rows, remote.schema, remote.row_groups, remote.problem) == (3, local.schema, (3,), None)
    assert remote.uri == f"s3://{bucket}/web/00000.parquet" and remote.size == local.size


def test_read_units_are_row_groups_tagged_with_their_shard_and_rows(tmp_path):
    table = pa.Table.from_pylist(shard_rows("r", 7), schema=INPUT_SCHEMA)
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=3)  # row groups of 3, 3, 1
    pq.write_table(table.slice(0, 2).drop_columns(["url"]), tmp_path / "00001.parquet")
    shards = inspect_shards(list_shards(str(tmp_path)), COLUMNS)
    read_schema, shards = unify(shards)
    units = read_units(shards)
    assert [(u.shard, u.row_group, u.first_row) for u in units] == [
        ("00000", 0, 0), ("00000", 1, 3), ("00000", 2, 6), ("00001", 0, 0)]
    second = read_unit(units[1], read_schema)
    assert second["key"].to_pylist() == ["r0003", "r0004", "r0005"]
    assert second[schema.ROW].to_pylist() == [3, 4, 5] and set(second[schema.SHARD].to_pylist()) == {"00000"}
    missing_url = read_unit(units[3], read_schema)  # a column this shard lacks reads as null
    assert missing_url["url"].null_count == 2 and missing_url.schema.names[:-2] == read_schema.names
    narrow = pa.schema([read_schema.field("key"), read_schema.field("url")])  # only these columns are read
    assert read_unit(units[1], narrow).column_names == ["key", "url", schema.SHARD, schema.ROW]


def test_read_columns_reads_a_whole_shard_in_order_with_absent_columns_null(tmp_path):
    table = pa.Table.from_pylist(shard_rows("c", 5), schema=INPUT_SCHEMA)
    pq.write_table(table.drop_columns(["url"]), tmp_path / "00000.parquet", row_group_size=2)
    shard = inspect_shards(list_shards(str(tmp_path)), COLUMNS)[0]
    fields = pa.schema([INPUT_SCHEMA.field("url"), INPUT_SCHEMA.field("jpg")])
    read = read_columns(shard, fields)
    assert read.schema == fields and read["url"].null_count == 5
    assert read["jpg"].to_pylist() == table["jpg"].to_pylist()
