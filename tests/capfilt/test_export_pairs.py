"""capfilt/export_pairs.py without Ray: the plan, exact sample slicing, the destination checks, missing extras."""

from __future__ import annotations

import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import commit, schema
from capfilt.config import ExportConfig
from capfilt.export_pairs import (FORMATS, ExportError, Piece, cut, explode, export_chunk, name_width, plan_export,
                            prepare_destination)
from tests.capfilt.capfilt_output import write_output

# Kept texts per row (None: failed, 0: rejected); shard 00001 keeps nothing.
SHARDS = {"00000": [1, 2, 0, None, 3, 1, 1], "00001": [0, 0, None], "00002": [2, 2, 1, 1, 0]}
KEPT, TEXTS = 9, 14


@pytest.fixture(scope="module")
def source(tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("export-source")
    monkeypatch_module.setattr(commit, "ROW_GROUP_ROWS", 2)  # many row groups: pieces start and end inside them
    return write_output(work / "out", work, SHARDS)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def data_rows(source) -> pa.Table:
    return pa.concat_tables([(source / "data" / f"{name}.parquet").read_table() for name in sorted(SHARDS)])


def test_samples_are_cut_into_even_files_across_shards():
    counts = [("a", 7), ("b", 0), ("c", 5)]
    assert cut(counts, 4) == [(Piece("a", 0, 4),), (Piece("a", 4, 7), Piece("c", 0, 1)), (Piece("c", 1, 5),)]
    assert cut(counts, 12) == [(Piece("a", 0, 7), Piece("c", 0, 5))]
    assert cut(counts, 0) == [(Piece("a", 0, 7),), (Piece("c", 0, 5),)]  # one per shard with samples
    assert name_width(1) == name_width(100_000) == 5 and name_width(100_001) == 6


def test_the_plan_comes_from_the_markers_and_names_files_without_gaps(source, tmp_path):
    plan = plan_export(source, tmp_path / "wds", ExportConfig(samples_per_shard=4))
    assert [c.name for c in plan.chunks] == ["00000", "00001", "00002"]
    assert [c.samples for c in plan.chunks] == [4, 4, 1]
    stats = (source / "stats.json").read_json()
    assert plan.source == {"shards": 3, "kept": stats["kept"], "texts": stats["texts"], "samples": KEPT}
    exploded = plan_export(source, tmp_path / "wds", ExportConfig(samples_per_shard=4, explode=True))
    assert sum(c.samples for c in exploded.chunks) == TEXTS and len(exploded.chunks) == 4
    hf = plan_export(source, tmp_path / "hf", ExportConfig(format="hf", samples_per_shard=0))
    assert [c.name for c in hf.chunks] == ["data-00000-of-00002", "data-00001-of-00002"]  # 00001 kept nothing
    assert len({plan.target.identity_key, exploded.target.identity_key, hf.target.identity_key}) == 3


@pytest.mark.parametrize("exploded", [False, True])
def test_each_file_holds_exactly_its_samples_in_order(source, tmp_path, exploded):
    plan = plan_export(source, tmp_path / "pq", ExportConfig(format="parquet", samples_per_shard=3, explode=exploded))
    for chunk in plan.chunks:
        marker = export_chunk(plan.target, chunk)
        assert marker["samples"] == chunk.samples
    written = pa.concat_tables([pq.read_table(tmp_path / "pq" / f"{c.name}.parquet") for c in plan.chunks])
    expected = explode(data_rows(source)) if exploded else data_rows(source)
    assert written.num_rows == (TEXTS if exploded else KEPT)
    assert written.to_pylist() == expected.select(written.column_names).to_pylist()
    if exploded:
        pairs = [(r["key"], r[schema.TEXT_INDEX], r[schema.TEXT]) for r in written.to_pylist()]
        assert len(set(pairs)) == TEXTS and all(r[schema.TEXT] == r[schema.TEXTS][r[schema.TEXT_INDEX]]
                                                for r in written.to_pylist())


def test_a_data_file_shorter_than_its_marker_fails_its_file(source, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(source.path, copy)
    shard = copy / "data" / "00002.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 2), shard)  # 2 of its 4 kept rows
    plan = plan_export(str(copy), tmp_path / "pq", ExportConfig(format="parquet", samples_per_shard=0))
    with pytest.raises(ExportError, match="fewer samples than its commit marker"):
        export_chunk(plan.target, plan.chunks[-1])
    assert not (tmp_path / "pq" / "_commits").exists()


def test_sources_and_destinations_that_cannot_be_exported(source, tmp_path):
    cfg = ExportConfig()
    with pytest.raises(ExportError, match="is the source folder or inside its data"):
        plan_export(source, source, cfg)
    with pytest.raises(ExportError, match="is the source folder or inside its data"):
        plan_export(source, source / "data" / "wds", cfg)
    plan_export(source, source / "webdataset", cfg)  # a folder of its own inside OUT is fine
    with pytest.raises(ExportError, match="not a capfilt run output"):
        plan_export(tmp_path, tmp_path / "x", cfg)
    empty = write_output(tmp_path / "empty", tmp_path / "work", {"00000": [0, None]})
    with pytest.raises(ExportError, match="no kept rows"):
        plan_export(empty, tmp_path / "x", cfg)
    with pytest.raises(ExportError, match="export.samples_per_shard"):
        plan_export(source, tmp_path / "x", ExportConfig(samples_per_shard=-1))
    # Tars that no export made are not overwritten silently.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "00000.tar").write_bytes(b"someone else's")
    with pytest.raises(ExportError, match="no capfilt export made"):
        prepare_destination(plan_export(source, tmp_path / "foreign", cfg), force=False)
    # Nor is a run output's identity replaced by an export's.
    with pytest.raises(ExportError, match="holds a capfilt run output"):
        prepare_destination(plan_export(source, empty, cfg), force=True)


def test_the_hf_format_names_its_extra_when_datasets_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without the package gives
    with pytest.raises(ImportError, match=r"pip install 'capfilt\[hf\]'"):
        FORMATS["hf"].check()


def test_webdataset_names_images_by_their_bytes_and_refuses_dotted_keys(source, tmp_path):
    from capfilt.export_pairs import image_extension
    from tests.tiny_blip import image_bytes

    assert [image_extension(image_bytes(0, fmt=f)) for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")] == \
        ["jpg", "png", "webp", "gif", "bmp", "tiff"]
    plan = plan_export(source, tmp_path / "wds", ExportConfig(samples_per_shard=0))
    rows = data_rows(source).slice(0, 2)
    dotted = rows.set_column(rows.schema.get_field_index("key"), "key", pa.array(["ok", "img.001"]))
    with pytest.raises(ExportError, match=r"key 'img.001' contains '\.'"):
        FORMATS["webdataset"].write(dotted, plan.target, plan.chunks[0])
    assert not (tmp_path / "wds" / f"{plan.chunks[0].name}.tar").exists()  # nothing half-written is left
