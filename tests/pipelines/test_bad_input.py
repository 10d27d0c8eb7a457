"""The whole bad-input corpus (tests/bad_input.py) through one real `capfilt run` on local Ray.

Every row must end in failed/ with its specific reason, or be scored into data/ or rejected/;
every input row appears exactly once; stats.json reconciles.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt import schema
from capfilt.cli import app
from tests.bad_input import BAD_UTF8, IMAGE_SETTINGS, MEGABYTE_CAPTION, PROCESSED, write_corpus
from tests.pipelines.test_run import RESOURCES

NUM_CAPTIONS = 2


@pytest.fixture(scope="module")
def corpus_run(ray_local, blip_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-input")
    expected = write_corpus(root / "input")
    out = root / "out"
    args = ["run", "--input", str(root / "input"), "--captioner", str(blip_dirs["captioner"]),
            "--filter", str(blip_dirs["filter"]), "--out", str(out), "--num-captions", str(NUM_CAPTIONS)]
    for item in [*RESOURCES, *IMAGE_SETTINGS]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # Output files per destination; read one by one (the int64-key shard keeps its own key type).
    rows = {dest: [r for p in sorted((out / dest).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
            for dest in schema.OUTPUT_DIRS}
    return {"input": root / "input", "out": out, "expected": expected, "rows": rows}


def test_every_row_lands_once_where_expected(corpus_run):
    expected, rows = corpus_run["expected"], corpus_run["rows"]
    landed = [(r["key"], dest, r) for dest in schema.OUTPUT_DIRS for r in rows[dest]]
    assert sorted(map(repr, (k for k, _, _ in landed))) == sorted(map(repr, expected))  # each key once
    wrong = {}
    for key, dest, row in landed:
        outcome = expected[key]
        if outcome is PROCESSED:
            ok = dest != schema.FAILED and row[schema.ERROR] is None and len(row[schema.SYNTHETIC]) == NUM_CAPTIONS
        else:
            ok = dest == schema.FAILED and outcome in (row[schema.ERROR] or "")
        if not ok:
            wrong[key] = (dest, row[schema.ERROR], outcome)
    assert not wrong
    assert sum(o is PROCESSED for o in expected.values()) >= 20  # the corpus is not all failures


def test_stats_reconcile(corpus_run):
    expected = corpus_run["expected"]
    stats = json.loads((corpus_run["out"] / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == len(expected)
    assert stats["failed"] == len(corpus_run["rows"][schema.FAILED])
    prefixes: dict[str, int] = {}
    for outcome in expected.values():
        if outcome is not PROCESSED:
            prefixes[outcome.split(":")[0]] = prefixes.get(outcome.split(":")[0], 0) + 1
    assert stats["failed_by_reason"] == prefixes
    assert stats["shards"] == 12 and _shard_reads(corpus_run["out"])["11_empty"] == 0
    assert sorted(stats["last_run"]["shards_failed_whole"]) == [
        "08_missing_image_column", "09_key_int64", "10_width_string"]
    assert stats["last_run"]["shards_unreadable"] == {}


def test_captions(corpus_run):
    by_key = {r["key"]: r for dest in (schema.DATA, schema.REJECTED) for r in corpus_run["rows"][dest]}
    # No web caption to score: only the synthetic captions compete.
    for key in ("cap_caption_null", "cap_caption_empty", "cap_caption_blank", "bin_null"):
        row = by_key[key]
        assert row[schema.CAPTION_ITM] is None and row[schema.CAPTION_KEEP] is False
        assert len(row[schema.SYNTHETIC_ITM]) == NUM_CAPTIONS
    # A megabyte caption is scored on its first tokens and passed through whole.
    big = by_key["cap_caption_1mb"]
    assert big["caption"] == MEGABYTE_CAPTION and big[schema.CAPTION_ITM] is not None
    assert by_key["cap_caption_unicode"][schema.CAPTION_ITM] is not None
    # A binary caption column is decoded: every output's caption column is text.
    ok = by_key["bin_ok"]
    assert ok["caption"] == "un café ☕" and ok[schema.CAPTION_ITM] is not None
    assert ok[schema.CAPTION_KEEP] == ("un café ☕" in ok[schema.TEXTS])
    for path in corpus_run["out"].glob("*/*.parquet"):
        assert pa.types.is_string(pq.read_schema(path).field("caption").type) or pa.types.is_large_string(
            pq.read_schema(path).field("caption").type), path


def test_invalid_utf8_is_failed_and_readable(corpus_run):
    failed = {r["key"]: r for r in corpus_run["rows"][schema.FAILED]}  # to_pylist decoded every string
    expected_text = BAD_UTF8.decode("utf-8", errors="replace")
    assert failed["str_invalid"]["caption"] == expected_text  # a string column gets U+FFFD in failed/
    assert failed["bin_invalid"]["caption"] == expected_text
    for name in ("02_caption_binary", "03_caption_bad_utf8"):
        pq.read_table(corpus_run["out"] / "failed" / f"{name}.parquet")["caption"].validate(full=True)


def test_schema_changes_between_shards(corpus_run):
    out = corpus_run["out"]
    # The extra column is carried through every streamed shard, null where it was absent.
    extra = {r["key"]: r.get("aesthetic") for dest in (schema.DATA, schema.REJECTED)
             for r in corpus_run["rows"][dest]}
    assert extra["extra0"] == 5.5 and extra["extra1"] == 6.25 and extra["img_good0"] is None
    # Safe promotions are read as the wider type.
    streamed = pq.read_schema(out / "data" / "06_text_large_string.parquet")
    assert streamed.field("jpg").type == pa.large_binary()
    # Shards failed as a whole keep their own schema.
    assert pq.read_schema(out / "failed" / "09_key_int64.parquet").field("key").type == pa.int64()
    assert pq.read_schema(out / "failed" / "10_width_string.parquet").field("width").type == pa.string()
    for dest in schema.OUTPUT_DIRS:
        assert len(list((out / dest).glob("*.parquet"))) == 12


def test_no_status_column_counts_as_downloaded(corpus_run):
    rows = [r for dest in (schema.DATA, schema.REJECTED) for r in corpus_run["rows"][dest]
            if str(r["key"]).startswith("nostatus")]
    assert len(rows) == 2 and all(r["status"] is None for r in rows)


def test_input_files_are_the_corpus(corpus_run):
    """Guards the corpus itself: the invalid-UTF-8 string shard really holds invalid bytes."""
    column = pq.read_table(Path(corpus_run["input"]) / "03_caption_bad_utf8.parquet")["caption"]
    with pytest.raises(pa.ArrowInvalid, match="UTF8"):
        column.validate(full=True)


def _shard_reads(out) -> dict[str, int]:
    import pyarrow.parquet as pq

    from capfilt.commit import SHARD_STATS

    return {row["shard"]: row["read"] for row in pq.read_table(out / SHARD_STATS).to_pylist()}
