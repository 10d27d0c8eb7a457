"""`capfilt export` on local Ray: what trainers' readers get back, exactly once, resumable, on S3 too.

The readers are the real ones: the `webdataset` library with open_clip's brace pattern and
decoders, `datasets.load_from_disk`, pandas on a parquet folder. The source is a committed
capfilt output (tests/capfilt/capfilt_output.py: written by capfilt.commit, scores chosen by hand).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from capfilt import commit, schema
from capfilt.cli import app
from capfilt.config import load_config
from capfilt.commit import COMMITS, ConfigMismatch
from capfilt.export_pairs import SUMMARY, explode
from capfilt.pipelines.export_pairs import run_export
from capfilt.storage import location
from tests.capfilt.capfilt_output import write_output
from tests.pipelines.killed_driver import kill_when
from tests.pipelines.test_faults import without_local_ray

SHARDS = {"00000": [1, 2, 0, None, 3, 1, 1], "00001": [0, 0, None], "00002": [2, 2, 1, 1, 0], "00003": [1, 1, 2]}
KEPT, TEXTS = 12, 18
PER_FILE = 5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    work = tmp_path_factory.mktemp("export-source")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commit, "ROW_GROUP_ROWS", 2)  # files start and end inside row groups
        return write_output(work / "out", work, SHARDS)


def data_rows(source) -> pa.Table:
    return pa.concat_tables([(source / "data" / f"{name}.parquet").read_table() for name in sorted(SHARDS)])


def export(source, dest, *settings: str, force: bool = False) -> dict:
    cfg = load_config(None, [f"export.samples_per_shard={PER_FILE}", "export.cpus_per_task=0.5",
                             "export.progress_seconds=0", *settings])
    return run_export(cfg, source, dest, force=force)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_webdataset(pattern: str) -> list[tuple]:
    """Samples as open_clip's loader takes them: brace-expanded shards, image from jpg or png, the txt."""
    pipeline = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "txt", "json")
    return list(pipeline)


@pytest.fixture(scope="module")
def webdataset_export(ray_local, source, tmp_path_factory) -> dict:
    dest = tmp_path_factory.mktemp("wds") / "wds"
    result = CliRunner().invoke(app, ["export", str(source.path), "--to", str(dest), "--format", "webdataset",
                                      "--samples-per-shard", str(PER_FILE), "--set", "export.cpus_per_task=0.5"])
    assert result.exit_code == 0, result.output
    return {"dest": dest, "output": result.output, "summary": json.loads((dest / SUMMARY).read_text())}


def test_open_clip_reads_every_kept_row_once_with_its_image_and_texts(webdataset_export, source):
    dest, summary = webdataset_export["dest"], webdataset_export["summary"]
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert f"--train-data '{dest}/{{00000..00002}}.tar' --train-num-samples {KEPT}" in webdataset_export["output"]
    samples = read_webdataset(summary["train_data"])
    stats = (source / "stats.json").read_json()
    assert len(samples) == summary["samples"] == stats["kept"] == KEPT
    rows = data_rows(source).to_pylist()
    assert [s[0] for s in samples] == [r["key"] for r in rows]  # every kept row once, in order
    for (_key, image, txt, meta), row in zip(samples, rows):
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels(row["jpg"]))
        assert txt == row[schema.TEXTS][0] and meta[schema.TEXTS] == row[schema.TEXTS]
        assert meta["url"] == row["url"] and meta[schema.SYNTHETIC] == row[schema.SYNTHETIC]
        assert meta[schema.CAPTION_ITM] == pytest.approx(row[schema.CAPTION_ITM])
        assert meta[schema.ROUND] == 1 and meta[schema.CAPTIONER] == "/models/c" and "jpg" not in meta
    assert any(name.endswith(".png") for p in dest.glob("*.tar") for name in _members(p))  # PNG bytes stay PNG
    per_tar = [json.loads((dest / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in per_tar] == [5, 5, 2] and sum(s["count"] for s in per_tar) == KEPT
    assert sum(s["texts"] for s in per_tar) == summary["texts"] == stats["texts"]


def _members(tar: Path) -> list[str]:
    import tarfile

    with tarfile.open(tar) as handle:
        return handle.getnames()


def test_a_rerun_skips_every_file_and_starts_no_ray(webdataset_export, source, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a re-run over a complete export must not start Ray")

    dest = webdataset_export["dest"]
    monkeypatch.setattr("capfilt.pipelines.export_pairs._write_files", forbidden)
    markers = {p.name: p.stat().st_mtime_ns for p in (dest / COMMITS).iterdir()}
    summary = export(source, dest, "export.format=webdataset")
    assert summary["last_run"]["files_skipped"] == 3 and summary["last_run"]["tasks_started"] is False
    assert summary["samples"] == KEPT
    assert {p.name: p.stat().st_mtime_ns for p in (dest / COMMITS).iterdir()} == markers


def test_a_killed_export_resumes_to_the_same_files(ray_local, source, tmp_path):
    dest = tmp_path / "wds"
    export(source, dest, "export.format=webdataset")
    clean = {p.name: p.read_bytes() for p in dest.glob("*.tar")}
    # What a kill leaves: files without their markers, a tar written but not committed, one never written.
    (dest / COMMITS / "00001.json").unlink()
    (dest / COMMITS / "00002.json").unlink()
    (dest / "00002.tar").unlink()
    summary = export(source, dest, "export.format=webdataset")
    assert summary["last_run"]["files_written"] == 2 and summary["last_run"]["files_skipped"] == 1
    assert {p.name: p.read_bytes() for p in dest.glob("*.tar")} == clean  # the same bytes again
    keys = [s[0] for s in read_webdataset(summary["train_data"])]
    assert sorted(keys) == sorted(r["key"] for r in data_rows(source).to_pylist()) and len(set(keys)) == KEPT


def test_exploded_webdataset_has_one_sample_per_kept_text(ray_local, source, tmp_path):
    summary = export(source, tmp_path / "wds", "export.format=webdataset", "export.explode=true")
    samples = read_webdataset(summary["train_data"])
    assert len(samples) == summary["samples"] == (source / "stats.json").read_json()["texts"] == TEXTS
    expected = [(f"{r['key']}_{i}", text) for r in data_rows(source).to_pylist() for i, text in enumerate(r["texts"])]
    assert [(key, txt) for key, _, txt, _ in samples] == expected
    assert summary["images"] == KEPT


def test_hf_load_from_disk_gives_images_and_text_lists(ray_local, source, tmp_path):
    import datasets

    summary = export(source, tmp_path / "hf", "export.format=hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(ds.features[schema.HF_IMAGE], datasets.Image)
    assert ds.features[schema.TEXTS] == datasets.Features.from_arrow_schema(
        pa.schema([pa.field(schema.TEXTS, pa.list_(pa.string()))]))[schema.TEXTS]
    assert ds.num_rows == summary["samples"] == (source / "stats.json").read_json()["kept"] == KEPT
    rows = data_rows(source).to_pylist()
    for example, row in zip(ds, rows):
        assert example["key"] == row["key"] and example[schema.TEXTS] == row[schema.TEXTS]
        assert np.array_equal(np.asarray(example[schema.HF_IMAGE].convert("RGB")), pixels(row["jpg"]))
    assert "jpg" not in ds.column_names


def test_exploded_parquet_has_one_row_per_kept_text(ray_local, source, tmp_path):
    summary = export(source, tmp_path / "pq", "export.format=parquet", "export.explode=true")
    frame = pd.read_parquet(tmp_path / "pq")  # the folder reads as one table (_-prefixed files skipped)
    assert len(frame) == summary["samples"] == TEXTS
    expected = explode(data_rows(source))
    assert list(zip(frame["key"], frame[schema.TEXT])) == list(zip(expected["key"].to_pylist(),
                                                                    expected[schema.TEXT].to_pylist()))
    assert frame.groupby("key").size().to_dict() == {r["key"]: len(r["texts"]) for r in data_rows(source).to_pylist()}
    assert all(isinstance(b, bytes) and pixels(b).shape == (48, 48, 3) for b in frame["jpg"])


def test_other_settings_are_refused_and_force_replaces_the_export(ray_local, source, tmp_path):
    dest = tmp_path / "pq"
    export(source, dest, "export.format=parquet")
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    with pytest.raises(ConfigMismatch, match="export.samples_per_shard: was 5, now 100"):
        export(source, dest, "export.format=parquet", "export.samples_per_shard=100")
    summary = export(source, dest, "export.format=parquet", "export.samples_per_shard=100", force=True)
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet"]  # the old files are gone
    assert pd.read_parquet(dest)["key"].tolist() == data_rows(source)["key"].to_pylist() and summary["files"] == 1


def test_a_file_that_fails_leaves_the_others_committed_and_exit_1(ray_local, source, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(source.path, copy)
    (copy / "data" / "00003.parquet").write_bytes(b"torn")  # rows of the last two files are unreadable
    dest = tmp_path / "hf"
    args = ["export", str(copy), "--to", str(dest), "--format", "hf", "--samples-per-shard", str(PER_FILE),
            "--set", "export.cpus_per_task=0.5", "--set", "export.max_retries=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "error: file data-00001-of-00003 was not written" in result.output
    assert "error: file data-00002-of-00003 was not written" in result.output
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["files_committed"] == 1 and not summary["complete"]
    assert sorted(p.name for p in (dest / COMMITS).iterdir()) == ["data-00000-of-00003.json"]
    assert not (dest / "state.json").exists()  # an incomplete HF folder does not load as if it were whole
    shutil.copy(source.path + "/data/00003.parquet", copy / "data" / "00003.parquet")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 files written, 1 skipped" in result.output
    import datasets

    assert datasets.load_from_disk(str(dest))["key"] == data_rows(source)["key"].to_pylist()


def test_an_s3_round_trip(ray_s3, tmp_path):
    bucket = ray_s3.bucket()
    src = write_output(f"s3://{bucket}/capfilt", tmp_path / "work", SHARDS)
    dest = f"s3://{bucket}/wds"
    summary = export(src, dest, "export.format=webdataset")
    assert summary["samples"] == (location(src) / "stats.json").read_json()["kept"] == KEPT
    local = tmp_path / "copy"
    local.mkdir()
    for info in location(dest).files(".tar"):
        (local / info.base_name).write_bytes(location(dest).at(info).read_bytes())
    assert summary["train_data"] == f"{dest}/{{00000..00002}}.tar"
    samples = read_webdataset(str(local / "{00000..00002}.tar"))
    assert [s[0] for s in samples] == data_rows(location(src))["key"].to_pylist()
    assert sorted(info.base_name for info in (location(dest) / COMMITS).files()) == [f"0000{i}.json" for i in range(3)]
    again = export(src, dest, "export.format=webdataset")
    assert again["last_run"]["files_skipped"] == 3 and again["last_run"]["tasks_started"] is False


@pytest.mark.slow  # two Ray start-ups in other processes (a minute or more on 2 cores); the resume logic itself is
# covered in CI by test_a_killed_export_resumes_to_the_same_files
def test_a_driver_killed_mid_export_resumes_to_the_same_files(ray_local, source, tmp_path):
    reference = tmp_path / "reference"
    export(source, reference, "export.format=webdataset", "export.samples_per_shard=1")
    dest = tmp_path / "wds"
    # One task at a time (each reserves every CPU slot), so the kill lands between commits.
    args = ["export", str(source.path), "--to", str(dest), "--samples-per-shard", "1",
            "--set", f"export.cpus_per_task={os.cpu_count()}"]
    with without_local_ray():
        kill_when(args, lambda: any((dest / COMMITS).glob("*.json")), tmp_path / "driver.log", timeout_s=240)
        at_kill = len(list((dest / COMMITS).glob("*.json")))
        assert 0 < at_kill < KEPT, f"kill came at {at_kill} of {KEPT} files:\n" + (tmp_path / "driver.log").read_text()
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    last = json.loads((dest / SUMMARY).read_text())["last_run"]
    assert at_kill <= last["files_skipped"] < KEPT  # a task running at the kill may still have committed
    assert last["files_written"] == KEPT - last["files_skipped"]
    assert {p.name: p.read_bytes() for p in dest.glob("*.tar")} == {p.name: p.read_bytes()
                                                                     for p in reference.glob("*.tar")}
    keys = [s[0] for s in read_webdataset(str(dest / f"{{00000..{KEPT - 1:05d}}}.tar"))]
    assert keys == data_rows(source)["key"].to_pylist()
