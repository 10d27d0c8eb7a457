"""Stage 6: the writer. A CPU task that writes each block's rows as staged parts of their shards.

It returns only what the driver needs to know when a shard is whole (part names, row ranges,
counts for the progress line), so the rows themselves, image bytes included, never travel to the
driver: the worker that ran the keep policy writes them where the output lives.
"""

from __future__ import annotations

import pyarrow as pa

from capfilt.commit import stage_parts
from capfilt.storage import location

STAGED_SCHEMA = pa.schema([
    ("shard", pa.string()), ("part", pa.string()), ("ranges", pa.list_(pa.int64())), ("rows", pa.int64()),
    ("kept", pa.int64()), ("rejected", pa.int64()), ("failed", pa.int64()),
])


class StageParts:
    """Ray task stage: policy-stage rows in, one small row per staged part out."""

    def __init__(self, staging: str):
        self.staging = location(staging)  # this run's staging folder (capfilt.commit.new_staging)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(stage_parts(batch, self.staging) if batch.num_rows else [], schema=STAGED_SCHEMA)
