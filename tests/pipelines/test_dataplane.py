"""The data plane: workers carry the rows, the driver only metadata; output order comes from the rows.

The driver process's own I/O is read from /proc/self/io around an in-process `run_capfilt`: the
rows (and their ~60 KB images) are read and written by Ray's worker processes, so what the driver
writes stays a small, fixed amount (logs, config, markers' aggregate) while the output grows.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt import schema
from capfilt.config import load_config
from capfilt.pipelines.run import run_capfilt
from tests.tiny_blip import encode, shard_rows, write_shard

SHARDS, ROWS = 4, 36
SETTINGS = ["run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25", "run.caption.max_length=3",
            "run.caption.min_length=1", "run.resources.progress_seconds=0.5"]


def photo_like(seed: int) -> bytes:
    """A ~60 KB JPEG: smooth gradients plus noise, the size of a web image after img2dataset's resize."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256]
    base = np.stack([(x + seed) % 256, (y * 2) % 256, (x + y) % 256], axis=-1).astype(np.float32)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=85)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataplane-inputs")
    for s in range(SHARDS):
        rows = shard_rows(f"d{s}", ROWS, failed=2, corrupt=1, seed=50 + s)
        for i, row in enumerate(rows):
            if row["status"] == "success" and i < ROWS - 3:
                row["jpg"] = photo_like(1000 * s + i)
        # Two row groups per shard: two read units, whose rows meet again in one output file.
        write_shard(root / f"{s:05d}.parquet", rows, row_group_size=ROWS // 2)
    return root


def config(inputs: Path, blip_dirs: dict, *extra: str):
    return load_config(None, [f"run.input={inputs}", f"run.caption.model={blip_dirs['captioner']}",
                              f"run.filter.model={blip_dirs['filter']}", *SETTINGS, *extra])


def driver_io() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().split("\n")
    return {key: int(value) for key, value in (line.split(": ") for line in lines if line)}


def ray_data_log_bytes() -> int:
    """Bytes of Ray Data's own log files, which the driver's executor appends to as time passes
    (a DEBUG progress record every few seconds): writes that grow with the run's duration, not its rows."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "ray-data"
    return sum(p.stat().st_size for p in logs.glob("*.log")) if logs.is_dir() else 0


def output_files(out: Path) -> dict[str, bytes]:
    return {f"{d}/{p.name}": p.read_bytes() for d in schema.OUTPUT_DIRS for p in sorted((out / d).glob("*.parquet"))}


@pytest.fixture(scope="module")
def measured(ray_local, inputs, blip_dirs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dataplane") / "out"
    logger = logging.getLogger("capfilt.run")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # The driver imports the stage classes (torch, transformers) and Ray Data's executor on first
    # use; do both first, so the reads measured below are the run's, not the imports'.
    import capfilt.stages.caption  # noqa: F401
    import capfilt.stages.filter  # noqa: F401

    ray_local.data.range(4).map_batches(lambda batch: batch).take_all()

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before, logs_before = driver_io(), ray_data_log_bytes()
            stats = run_capfilt(config(inputs, blip_dirs), out)
            after, logs_after = driver_io(), ray_data_log_bytes()
    finally:
        logger.removeHandler(handler)
    return {"out": out, "stats": stats, "io": {k: after[k] - before[k] for k in after},
            "ray_data_logs": logs_after - logs_before,
            "logs": [r.getMessage() for r in records], "warnings": caught}


def test_the_driver_writes_a_small_fraction_of_the_output(measured):
    output_bytes = sum(len(b) for b in output_files(measured["out"]).values())
    assert output_bytes > 4_500_000  # the images (144 of ~33 KB) are in the output
    io_, logs = measured["io"], measured["ray_data_logs"]
    # Before the workers wrote, the driver wrote 1.04x the output bytes itself. What it writes
    # now is JSON per shard plus Ray Data's log, which grows with the run's duration (a slow,
    # loaded machine writes more of it) and is not the rows.
    assert io_["write_bytes"] - logs < 0.1 * output_bytes, (io_, logs, output_bytes)
    assert io_["wchar"] - logs < 0.1 * output_bytes, (io_, logs, output_bytes)
    assert io_["rchar"] < 0.1 * output_bytes, (io_, output_bytes)  # nor does it read the rows
    stats = measured["stats"]
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == SHARDS * ROWS


def test_output_does_not_depend_on_block_order(measured, inputs, blip_dirs, tmp_path):
    # Two captioner actors finish blocks in another order, and Ray bundles them differently; each
    # model call still sees the same rows (capfilt.stages.common.model_batches) and each file is
    # written in input order: byte for byte the same output.
    other = config(inputs, blip_dirs, "run.resources.captioner_actors=2", "run.caption.batch_size=8",
                   "run.filter.batch_size=8")
    reference = config(inputs, blip_dirs, "run.caption.batch_size=8", "run.filter.batch_size=8")
    run_capfilt(other, tmp_path / "two-actors")
    run_capfilt(reference, tmp_path / "one-actor")
    assert output_files(tmp_path / "two-actors") == output_files(tmp_path / "one-actor")
    for path in sorted((tmp_path / "two-actors" / "failed").glob("*.parquet")):
        keys = pq.read_table(path)["key"].to_pylist()
        assert keys == sorted(keys) and len(keys) == 3  # input order within the shard


def test_progress_lines_report_rows_shards_speed_and_keep_rate(measured):
    lines = [m for m in measured["logs"] if m.startswith("progress: ")]
    assert lines, measured["logs"]
    assert lines[-1].startswith(f"progress: {SHARDS * ROWS:,}/{SHARDS * ROWS:,} rows (100.0%), "
                                f"{SHARDS}/{SHARDS} shards committed, ")
    assert " img/s, ETA " in lines[-1] and "kept " in lines[-1] and "% of scored rows" in lines[-1]


def test_the_driver_warns_of_no_deprecations(measured):
    deprecations = [str(w.message) for w in measured["warnings"]
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == []


def test_the_model_actors_get_only_the_columns_they_use(ray_local, inputs, blip_dirs):
    """The blocks the actor pool takes: the key (caption seeds), the image bytes, the caption, the
    error so far and the row's place; no other input column, no pixels."""
    from capfilt.pipelines.run import model_inputs
    from capfilt.shards import inspect_shards, list_shards, unify

    cfg = config(inputs, blip_dirs).run
    read_schema, shards = unify(inspect_shards(list_shards(str(inputs)), cfg.columns))
    batch = next(iter(model_inputs(cfg, shards, read_schema).iter_batches(batch_format="pyarrow", batch_size=None)))
    assert batch.column_names == [schema.SHARD, schema.ROW, "key", "jpg", "caption", schema.ERROR]
    assert "url" in read_schema.names and "status" in read_schema.names  # read by the prepare stage, not sent


def test_the_object_store_holds_jpeg_bytes_not_pixels(measured, inputs):
    """Ray Data's own count of each operator's output blocks: the JPEGs once, then scores and texts."""
    stats = measured["stats"]
    rows = stats["read"]
    jpeg = sum(len(v) for p in sorted(inputs.glob("*.parquet")) for v in pq.read_table(p)["jpg"].to_pylist()
               if v) / rows
    blocks = stats["last_run"]["block_bytes"]
    prepared = next(v for k, v in blocks.items() if "Prepare" in k)
    assert 0.8 * jpeg < prepared / rows < 1.2 * jpeg  # the image bytes, once, and a few small columns
    after_models = {k: v for k, v in blocks.items() if "Prepare" not in k}
    assert after_models and all(v / rows < 0.05 * jpeg for v in after_models.values()), after_models
    assert sum(blocks.values()) / rows < 3 * jpeg  # the bound, end to end
