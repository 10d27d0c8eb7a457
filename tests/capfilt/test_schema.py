"""The output contract in capfilt/schema.py: names, types, collisions."""

from __future__ import annotations

import pyarrow as pa
import pytest

from capfilt import schema


def test_added_fields_are_the_documented_contract():
    assert schema.ADDED_NAMES == [
        "caption_itm", "caption_itc", "caption_keep", "synthetic", "synthetic_itm", "synthetic_itc",
        "synthetic_keep", "texts", "error", "round", "captioner", "filter", "threshold", "keep_policy"]
    types = {f.name: f.type for f in schema.ADDED_FIELDS}
    assert types["synthetic"] == types["texts"] == pa.list_(pa.string())
    assert types["synthetic_itm"] == pa.list_(pa.float32()) and types["synthetic_keep"] == pa.list_(pa.bool_())
    assert types["caption_itm"] == pa.float32() and types["round"] == pa.int32()


def test_transient_columns_never_collide_with_written_ones():
    assert len(set(schema.TRANSIENT)) == len(schema.TRANSIENT)
    assert not set(schema.TRANSIENT) & set(schema.ADDED_NAMES)
    assert all(name.startswith("_") for name in schema.TRANSIENT)
    assert schema.OUTPUT_DIRS == ("data", "rejected", "failed")


def test_output_schema_passes_input_columns_through_first():
    source = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("extra", pa.int16())])
    out = schema.output_schema(source)
    assert out.names[:3] == ["key", "jpg", "extra"] and out.names[3:] == schema.ADDED_NAMES
    assert out.field("extra").type == pa.int16()


def test_output_schema_refuses_colliding_input_columns():
    with pytest.raises(ValueError, match=r"\['texts'\] collide"):
        schema.output_schema(pa.schema([("key", pa.string()), ("texts", pa.string())]))


def test_require_columns_names_the_config_key():
    with pytest.raises(KeyError, match=r"column 'img' \(run.columns.image\) is missing"):
        schema.require_columns(pa.schema([("key", pa.string())]), {"key": "key", "image": "img"}, "shard 0")
