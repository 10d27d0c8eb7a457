"""What the model stages share: per-row failure isolation, model batches, and the fault-injection
hook the fault tests use. Safe loading is `capfilt.embed`'s; device and dtype choice is
`capfilt.model.blip_ops.pick_device`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from capfilt import schema

if TYPE_CHECKING:  # the device decoder's check needs no torch import of its own
    import torch

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


def decode_device(cfg: Any, device: torch.device) -> torch.device | None:
    """Where a model actor decodes its JPEGs: its GPU with `run.resources.decode_on_device`, else
    None (the CPU decoder). Checked when the actor starts: the device decoder needs torchvision."""
    if not (cfg.resources.decode_on_device and device.type == "cuda"):
        return None
    try:
        import torchvision.io  # noqa: F401 - nvJPEG's batched decode_jpeg
    except Exception as err:  # noqa: BLE001 - an import that fails for any reason is the same answer
        raise ValueError(f"run.resources.decode_on_device needs torchvision built for this torch and CUDA "
                         f"({type(err).__name__}: {err})") from None
    return device


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
