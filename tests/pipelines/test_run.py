"""`capfilt run` end to end on local Ray: output contract, accounting, resumption, refusal to mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastparquet
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt import schema
from capfilt.cli import app
from capfilt.config import load_config
from capfilt.commit import COMMITS, IDENTITY, SHARD_STATS, ConfigMismatch
from capfilt.pipelines.run import run_capfilt
from tests.tiny_blip import INPUT_SCHEMA, shard_rows, write_shard

THRESHOLD = 0.5
# Small pools and fractional CPUs: the session's local Ray has 2 CPUs.
RESOURCES = ["run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25",
             "run.caption.batch_size=4", "run.filter.batch_size=4", "run.caption.max_length=6",
             "run.caption.min_length=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Four shards: two normal (12 rows: 2 failed downloads, 1 corrupt image each), one missing
    the image column (its 4 rows fail as a whole), one empty."""
    root = tmp_path_factory.mktemp("inputs")
    write_shard(root / "00000.parquet", shard_rows("a", 12, seed=1))
    write_shard(root / "00001.parquet", shard_rows("b", 12, seed=2))
    no_image = pa.Table.from_pylist(shard_rows("c", 4, seed=3), schema=INPUT_SCHEMA).drop_columns(["jpg"])
    pq.write_table(no_image, root / "00002.parquet")
    write_shard(root / "00003.parquet", [])
    return root


@pytest.fixture(scope="module")
def first_run(ray_local, inputs, blip_dirs, tmp_path_factory) -> dict:
    """One `capfilt run` through the CLI; later tests read (or copy) its output."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["run", "--input", str(inputs), "--captioner", str(blip_dirs["captioner"]),
            "--filter", str(blip_dirs["filter"]), "--out", str(out), "--num-captions", "2",
            "--threshold", str(THRESHOLD), "--keep", "both", "--round", "1"]
    for item in RESOURCES:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output,
            "cfg": load_config(None, [f"run.input={inputs}", f"run.caption.model={blip_dirs['captioner']}",
                                      f"run.filter.model={blip_dirs['filter']}", "run.caption.num_captions=2",
                                      f"run.filter.threshold={THRESHOLD}", "run.round=1", *RESOURCES])}


def read_dir(out: Path, dest: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / dest).glob("*.parquet"))],
                            promote_options="default")


def test_every_input_row_lands_exactly_once_with_its_columns(first_run, inputs):
    out = first_run["out"]
    for dest in schema.OUTPUT_DIRS:
        assert sorted(p.name for p in (out / dest).glob("*.parquet")) == [f"0000{i}.parquet" for i in range(4)]
    input_keys = sorted(k for p in sorted(inputs.glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist())
    tables = {dest: read_dir(out, dest) for dest in schema.OUTPUT_DIRS}
    output_keys = sorted(k for t in tables.values() for k in t["key"].to_pylist())
    assert output_keys == input_keys and len(input_keys) == 28
    assert tables[schema.DATA].num_rows > 0 and tables[schema.REJECTED].num_rows > 0
    # Input columns pass through unchanged, CapFilt's columns follow, nothing transient leaks.
    data = pq.read_table(out / "data" / "00000.parquet")
    assert data.schema == schema.output_schema(INPUT_SCHEMA)
    source = {r["key"]: r for r in pq.read_table(inputs / "00000.parquet").to_pylist()}
    for row in data.to_pylist():
        assert {k: row[k] for k in INPUT_SCHEMA.names} == source[row["key"]]
        assert row[schema.ROUND] == 1 and row[schema.THRESHOLD] == THRESHOLD and row[schema.KEEP_POLICY] == "both"


def test_failed_rows_carry_reasons_and_stats_reconcile(first_run):
    out = first_run["out"]
    failed = read_dir(out, schema.FAILED).to_pylist()
    reasons = {r["key"]: r[schema.ERROR] for r in failed}
    assert reasons["a0011"] == reasons["b0010"] == "download: timed out"
    assert reasons["a0009"].startswith("decode: ")
    assert reasons["c0000"].startswith("schema: column 'jpg' (run.columns.image) is missing")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 28
    assert stats["failed_by_reason"] == {"decode": 2, "download": 4, "schema": 4}
    assert stats["kept"] == read_dir(out, schema.DATA).num_rows
    scored = read_dir(out, schema.DATA).to_pylist() + read_dir(out, schema.REJECTED).to_pylist()
    assert stats["synthetic_generated"] == 2 * len(scored) == 2 * (stats["kept"] + stats["rejected"])
    assert stats["synthetic_kept"] == sum(sum(r[schema.SYNTHETIC_KEEP]) for r in scored)
    assert stats["web_kept"] == sum(r[schema.CAPTION_KEEP] for r in scored)
    per_shard = {row["shard"]: row for row in pq.read_table(out / SHARD_STATS).to_pylist()}
    assert per_shard["00000"]["read"] == 12 and per_shard["00003"]["read"] == 0 and len(per_shard) == 4
    assert sorted(p.name for p in (out / COMMITS).iterdir()) == [f"0000{i}.json" for i in range(4)]
    for name in ("00000", "00002"):  # each marker holds its shard's counts, as stats_shards.parquet does
        marker = json.loads((out / COMMITS / f"{name}.json").read_text())
        assert marker["shard"] == name and marker["counts"]["read"] == per_shard[name]["read"]
        assert marker["counts"]["failed"] == per_shard[name]["failed"]
    assert not (out / ".staging").exists()
    assert "read 28" in first_run["output"] and "every row failed" in first_run["output"]


def test_kept_texts_follow_the_threshold(first_run):
    out = first_run["out"]
    for dest in (schema.DATA, schema.REJECTED):
        for row in read_dir(out, dest).to_pylist():
            expected = ([row["caption"]] if row[schema.CAPTION_ITM] >= THRESHOLD else []) + [
                text for text, itm in zip(row[schema.SYNTHETIC], row[schema.SYNTHETIC_ITM]) if itm >= THRESHOLD]
            assert row[schema.TEXTS] == list(dict.fromkeys(expected))
            assert (dest == schema.DATA) == bool(row[schema.TEXTS])
            assert row[schema.SYNTHETIC_KEEP] == [itm >= THRESHOLD for itm in row[schema.SYNTHETIC_ITM]]


def test_pyarrow_and_fastparquet_read_the_same_lists(first_run):
    files = sorted(str(p) for p in (first_run["out"] / "data").glob("*.parquet"))
    arrow = pq.read_table(first_run["out"] / "data").to_pylist()
    frame = fastparquet.ParquetFile(files).to_pandas()
    assert len(frame) == len(arrow)
    by_key = {row["key"]: row for row in arrow}
    for _, row in frame.iterrows():
        expected = by_key[row["key"]]
        assert list(row[schema.SYNTHETIC]) == expected[schema.SYNTHETIC]
        assert list(row[schema.TEXTS]) == expected[schema.TEXTS]
        assert [bool(v) for v in row[schema.SYNTHETIC_KEEP]] == expected[schema.SYNTHETIC_KEEP]
        assert list(row[schema.SYNTHETIC_ITM]) == pytest.approx(expected[schema.SYNTHETIC_ITM])
        assert len(row[schema.SYNTHETIC]) == 2


def test_rerun_does_no_work(first_run, monkeypatch):
    out = first_run["out"]
    def output_mtimes() -> dict:  # the rows' files (stats files are rewritten by every run)
        return {p: p.stat().st_mtime_ns for d in schema.OUTPUT_DIRS for p in (out / d).glob("*.parquet")}

    before = output_mtimes()
    markers = {p.name: p.read_bytes() for p in (out / COMMITS).iterdir()}

    def forbidden(*args, **kwargs):
        raise AssertionError("a rerun over committed shards must not start Ray or build the pipeline")

    monkeypatch.setattr("capfilt.pipelines.run.build_dataset", forbidden)
    monkeypatch.setattr("capfilt.pipelines.run.start_ray", forbidden)
    monkeypatch.setattr("capfilt.pipelines.ray_env.init_ray", forbidden)
    stats = run_capfilt(first_run["cfg"], out)
    assert stats["last_run"]["pipeline_started"] is False
    assert stats["last_run"]["shards_skipped"] == 4 and stats["last_run"]["rows_through_models"] == 0
    assert {p.name: p.read_bytes() for p in (out / COMMITS).iterdir()} == markers
    assert output_mtimes() == before and len(before) == 12
    assert stats["read"] == 28


def test_an_uncommitted_shard_is_redone_identically(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    original = pq.read_table(out / "data" / "00001.parquet")
    (out / COMMITS / "00001.json").unlink()  # as if the job died before committing it
    for dest in schema.OUTPUT_DIRS:
        (out / dest / "00001.parquet").unlink()
    stats = run_capfilt(first_run["cfg"], out)
    assert stats["last_run"]["shards_processed"] == 1 and stats["last_run"]["rows_through_models"] == 12
    assert stats["read"] == 28
    # Captions are seeded per row key, so the redone shard is the same, caption for caption.
    assert pq.read_table(out / "data" / "00001.parquet").equals(original)


@pytest.mark.parametrize("fuse, actors", [(False, 1), (True, 2)])
def test_two_pools_or_two_actors_write_the_same_files(first_run, tmp_path, fuse, actors):
    """The default (one actor running both models on the block it decoded) == a captioner pool and
    a filter pool that each decode, == two such actors sharing the blocks: byte-identical output."""
    from dataclasses import replace

    cfg = first_run["cfg"]
    assert cfg.run.resources.fuse_models  # first_run ran the default
    resources = replace(cfg.run.resources, fuse_models=fuse, captioner_actors=actors)
    stats = run_capfilt(replace(cfg, run=replace(cfg.run, resources=resources)), tmp_path / "out")
    assert stats["read"] == 28
    for dest in schema.OUTPUT_DIRS:
        files = sorted(p.name for p in (first_run["out"] / dest).glob("*.parquet"))
        assert files == sorted(p.name for p in (tmp_path / "out" / dest).glob("*.parquet"))
        for name in files:
            assert (tmp_path / "out" / dest / name).read_bytes() == (first_run["out"] / dest / name).read_bytes(), name


SCORES = (schema.CAPTION_ITM, schema.CAPTION_ITC, schema.SYNTHETIC_ITM, schema.SYNTHETIC_ITC)


def flat(values: list) -> list[float]:
    """Scores (a float or a list of floats per row, null for none) as one list, nulls as NaN."""
    out = []
    for value in values:
        out.extend(value if isinstance(value, list) else [float("nan") if value is None else value])
    return out


def test_the_output_is_the_stages_applied_in_process(first_run, inputs):
    """The Ray pipeline (narrow rows, decoding in the actor, the commit joining the input columns
    back) writes what the stage classes compute on the whole shard in one process, row for row."""
    from capfilt.commit import route
    from capfilt.shards import inspect_shards, list_shards, read_unit, read_units, unify
    from capfilt.stages.fused import CaptionAndFilter
    from capfilt.stages.policy import KeepPolicy
    from capfilt.stages.prepare import Prepare

    run = first_run["cfg"].run
    read_schema, shards = unify(inspect_shards(list_shards(str(inputs)), run.columns))
    shard = next(s for s in shards if s.name == "00001")
    rows = pa.concat_tables([read_unit(u, read_schema) for u in read_units([shard])])
    decided = KeepPolicy(run)(CaptionAndFilter(run)(Prepare(run)(rows)))
    for dest, expected in route(decided).items():
        written = pq.read_table(first_run["out"] / dest / "00001.parquet")
        assert written["key"].to_pylist() == expected["key"].to_pylist(), dest
        for column in schema.ADDED_NAMES:
            got = written[column].to_pylist()
            want = expected[column].cast(written.schema.field(column).type).to_pylist()
            if column in SCORES:  # texts are padded per model batch, and Ray may cut those batches at other rows
                np.testing.assert_allclose(flat(got), flat(want), rtol=0, atol=1e-5, err_msg=f"{dest} {column}")
            else:
                assert got == want, (dest, column)
        source = {r["key"]: r for r in pq.read_table(inputs / "00001.parquet").to_pylist()}
        for row in written.to_pylist():
            assert row["jpg"] == source[row["key"]]["jpg"] and row["url"] == source[row["key"]]["url"]


def test_changed_settings_are_refused_unless_forced(first_run, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    changed = load_config(None, [f"run.input={inputs}", f"run.caption.model={first_run['cfg'].run.caption.model}",
                                 f"run.filter.model={first_run['cfg'].run.filter.model}",
                                 "run.caption.num_captions=2", "run.filter.threshold=0.7", "run.round=1",
                                 *RESOURCES])
    with pytest.raises(ConfigMismatch, match=r"filter\.threshold: was 0\.5, now 0\.7"):
        run_capfilt(changed, out)
    # --force starts over; on the shards that need no model (bad schema, empty) it runs without Ray.
    only_whole = load_config(None, [f"run.input={inputs}/0000[23].parquet",
                                    *[f"{k}={v}" for k, v in (("run.caption.model", changed.run.caption.model),
                                                              ("run.filter.model", changed.run.filter.model))],
                                    "run.filter.threshold=0.7"])
    stats = run_capfilt(only_whole, out, force=True)
    assert not (out / "data" / "00000.parquet").exists()
    assert stats["shards"] == 2 and stats["read"] == stats["failed"] == 4
    assert json.loads((out / IDENTITY).read_text())["settings"]["filter"]["threshold"] == 0.7


def test_a_changed_input_file_is_redone(first_run, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    changed_inputs = tmp_path / "inputs"
    shutil.copytree(inputs, changed_inputs)  # copy2 keeps mtimes: nothing changed yet
    cfg = load_config(None, [f"run.input={changed_inputs}", f"run.caption.model={first_run['cfg'].run.caption.model}",
                             f"run.filter.model={first_run['cfg'].run.filter.model}", "run.caption.num_captions=2",
                             f"run.filter.threshold={THRESHOLD}", "run.round=1", *RESOURCES])
    pq.write_table(pa.Table.from_pylist(shard_rows("d", 3), schema=INPUT_SCHEMA).drop_columns(["jpg"]),
                   changed_inputs / "00002.parquet")
    (changed_inputs / "00004.parquet").write_bytes(b"not parquet at all")
    stats = run_capfilt(cfg, out)
    assert stats["last_run"]["shards_skipped"] == 3 and stats["last_run"]["pipeline_started"] is False
    assert "00004" in stats["last_run"]["shards_unreadable"]
    assert pq.read_table(out / "failed" / "00002.parquet")["key"].to_pylist() == ["d0000", "d0001", "d0002"]
    assert stats["read"] == 24 + 3


def test_cli_reports_bad_settings_by_key(tmp_path, inputs, blip_dirs):
    runner = CliRunner()
    models = ["--captioner", str(blip_dirs["captioner"]), "--filter", str(blip_dirs["filter"])]
    result = runner.invoke(app, ["run", "--input", str(inputs), "--out", str(tmp_path / "o"), "--filter", "x"])
    assert result.exit_code == 1 and "run.caption.model is empty" in result.output
    result = runner.invoke(app, ["run", "--input", str(inputs), "--out", str(tmp_path / "o"), "--captioner",
                                 str(tmp_path), "--filter", str(blip_dirs["filter"])])
    assert result.exit_code == 1 and "run.caption.model" in result.output and "no config.json" in result.output
    result = runner.invoke(app, ["run", "--input", str(inputs), "--out", str(tmp_path / "o"), *models,
                                 "--set", "run.filter.treshold=0.3"])
    assert result.exit_code == 1 and "run.filter.treshold" in result.output
    result = runner.invoke(app, ["run", "--input", str(inputs), "--out", str(tmp_path / "o"), *models,
                                 "--set", "run.resources.max_tasks_in_flight_per_actor=0"])
    assert result.exit_code == 1 and "run.resources.max_tasks_in_flight_per_actor must be at least 1" in result.output
    result = runner.invoke(app, ["run", "--input", str(tmp_path / "nothing-*.parquet"), "--out",
                                 str(tmp_path / "o"), *models])
    assert result.exit_code == 1 and "no parquet shards match" in result.output
