"""What the model stages share: per-row failure isolation, model batches, and the fault-injection
hook the fault tests use. Safe loading is `capfilt.embed`'s; device and dtype choice is
`capfilt.model.blip_ops.pick_device`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from capfilt import schema

log = logging.getLogger("capfilt.stages")

# Fault injection (tests and fault drills only; unset, it costs one dict lookup per actor).
# CAPFILT_CHAOS="caption:2" makes the first captioner process that reaches its 2nd batch exit
# mid-batch (model work done, result never returned), once per run: the marker file
# CAPFILT_CHAOS_DIR/caption.once survives actor restarts. "filter:1:always" makes every filter
# process exit on its 1st batch (an actor that keeps dying). Each exit appends its pid to
# CAPFILT_CHAOS_DIR/<stage>.fired. Several faults: comma-separated. The driver forwards both
# variables to the actors (pipelines.ray_env.actor_pool_args).
CHAOS_ENV = "CAPFILT_CHAOS"
CHAOS_DIR_ENV = "CAPFILT_CHAOS_DIR"
CHAOS_EXIT_CODE = 75


class Chaos:
    """Counts one stage's batches in this process and exits at the configured one."""

    def __init__(self, stage: str):
        self.stage = stage
        self.batches = 0
        self.at: int | None = None
        self.always = False
        for spec in filter(None, os.environ.get(CHAOS_ENV, "").split(",")):
            name, *rest = spec.strip().split(":")
            if len(rest) not in (1, 2) or not rest[0].isdigit() or rest[1:] not in ([], ["once"], ["always"]):
                raise ValueError(f"{CHAOS_ENV}: {spec!r} is not STAGE:BATCH[:once|always]")
            if name == stage:
                self.at, self.always = int(rest[0]), rest[1:] == ["always"]
                self.directory = Path(os.environ[CHAOS_DIR_ENV])  # required: a fault must leave proof

    def tick(self) -> None:
        """Call once per batch, after the work and before returning it."""
        if self.at is None:
            return
        self.batches += 1
        if self.batches != self.at:
            return
        if not self.always:
            try:  # O_EXCL: exactly one process in the whole run fires a "once" fault
                os.close(os.open(self.directory / f"{self.stage}.once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        with open(self.directory / f"{self.stage}.fired", "a") as record:
            record.write(f"{os.getpid()}\n")
        log.error("chaos: %s process %d exits on its batch %d", self.stage, os.getpid(), self.batches)
        os._exit(CHAOS_EXIT_CODE)  # no cleanup, no exception: as a segfault or an OOM kill would


def pixel_array(batch: pa.Table) -> pa.Array:
    """The `_pixels` column as one array: its only chunk as it is (no copy), else the chunks joined once."""
    column = batch[schema.PIXELS]
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def pixel_rows(array: pa.Array, rows: Sequence[int]) -> np.ndarray:
    """`rows` of the `_pixels` column (raw uint8 [S, S, 3] values) -> uint8 [B, S, S, 3], read-only.

    Read straight from the Arrow data buffer (in a Ray worker, the object store's shared memory):
    when the rows' values lie back to back (a model batch of consecutive good rows, the usual
    case) the result is a view of that buffer, no copy; otherwise one gather copies only those
    rows. Nothing goes through Python bytes objects.
    """
    index = np.asarray(rows, dtype=np.int64)
    if array.type != pa.binary():
        raise ValueError(f"{schema.PIXELS}: expected binary values, got {array.type}")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]  # [n + 1]
    starts, sizes = offsets[index], offsets[index + 1] - offsets[index]  # [B], [B]
    size = int(sizes[0]) if len(index) else 0
    side = int(round((size / 3) ** 0.5))
    if not size or side * side * 3 != size or (sizes != size).any():  # a null row has 0 bytes
        raise ValueError(f"{schema.PIXELS}: values of {sorted(set(sizes.tolist()))} bytes in rows {list(rows)}, "
                         "not one square RGB image size")
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)  # the whole data buffer, zero-copy
    if (np.diff(starts) == size).all():  # back to back: a view
        block = data[starts[0] : starts[0] + len(index) * size]
    else:
        block = np.empty(len(index) * size, dtype=np.uint8)  # one copy of these rows only
        for i, start in enumerate(starts):
            block[i * size : (i + 1) * size] = data[start : start + size]
    block.flags.writeable = False  # the same for both: a view must never write into the batch
    return block.reshape(len(index), side, side, 3)


def model_batches(batch: pa.Table, rows: list[int], size: int) -> list[list[int]]:
    """`rows` of `batch` cut into the batches a model stage runs, the same whatever block they came in.

    Rows are grouped by input shard and by position in it (`_row // size`), so each model call
    sees the same rows (and pads its texts to the same length) however Ray bundled the blocks:
    a redone shard gets bit-identical scores. Without those columns (a stage called on its
    own), consecutive rows are cut into batches of `size`.
    """
    if schema.SHARD not in batch.column_names or schema.ROW not in batch.column_names:
        return [rows[i:i + size] for i in range(0, len(rows), size)]
    shards = batch[schema.SHARD].to_pylist()
    positions = batch[schema.ROW].to_pylist()
    groups: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        groups.setdefault((shards[row], positions[row] // size), []).append(row)
    return [sorted(group, key=positions.__getitem__) for _, group in sorted(groups.items())]


def map_rows_isolated(fn: Callable[[list[int]], list[Any]], batches: list[list[int]],
                      stage: str) -> tuple[list[int], list[Any], list[str | None]]:
    """Run `fn` on each batch of rows; if it raises, retry that batch one row at a time.

    Returns (rows, results, errors), aligned: one bad row (or an out-of-memory batch) costs that
    row a recorded "<stage>: <reason>" instead of failing the block and with it the job.
    """
    rows: list[int] = []
    results: list[Any] = []
    errors: list[str | None] = []
    for group in batches:
        rows.extend(group)
        try:
            results.extend(fn(group))
            errors.extend([None] * len(group))
            continue
        except Exception as err:  # noqa: BLE001 - isolated below, row by row
            if len(group) == 1:
                results.append(None)
                errors.append(f"{stage}: {type(err).__name__}: {err}")
                continue
            log.warning("%s failed on a batch of %d rows (%s); retrying row by row", stage, len(group), err)
        for row in group:
            try:
                results.extend(fn([row]))
                errors.append(None)
            except Exception as err:  # noqa: BLE001 - recorded per row
                results.append(None)
                errors.append(f"{stage}: {type(err).__name__}: {err}")
    return rows, results, errors


def scatter(values: list[Any], rows: list[int], n: int) -> list[Any]:
    """Values for `rows` placed into a length-`n` list, None elsewhere."""
    out: list[Any] = [None] * n
    for row, value in zip(rows, values):
        out[row] = value
    return out


def usable_rows(batch: pa.Table, *error_columns: str) -> list[int]:
    """Indices of rows with no error so far (a model stage skips the others)."""
    ok = np.ones(batch.num_rows, dtype=bool)
    for name in error_columns:
        if name in batch.column_names:
            ok &= np.asarray(batch[name].is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return np.flatnonzero(ok).tolist()
