"""Counts: per shard (in its commit marker) and over a whole output (`stats.json`).

Every input row is counted once, in the folder it went to: read = kept + rejected + failed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema

COUNT_FIELDS = ("read", "kept", "rejected", "failed", "synthetic_generated", "synthetic_kept", "web_kept", "texts")


@dataclass
class ShardCounts:
    read: int = 0
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    failed_by_reason: Counter = dataclasses.field(default_factory=Counter)
    synthetic_generated: int = 0
    synthetic_kept: int = 0
    web_kept: int = 0
    texts: int = 0

    def add(self, dest: str, table: pa.Table) -> None:
        """Count the rows of `table`, all bound for the output folder `dest`."""
        n = table.num_rows
        self.read += n
        if dest == schema.FAILED:
            self.failed += n
            for error in table[schema.ERROR].to_pylist():
                self.failed_by_reason[error.split(":", 1)[0].strip()] += 1
            return
        if dest == schema.DATA:
            self.kept += n
        else:
            self.rejected += n
        self.synthetic_generated += int(pc.sum(pc.list_value_length(table[schema.SYNTHETIC])).as_py() or 0)
        self.synthetic_kept += int(pc.sum(pc.cast(pc.list_flatten(table[schema.SYNTHETIC_KEEP]), pa.int64()))
                                   .as_py() or 0)
        self.web_kept += int(pc.sum(pc.cast(table[schema.CAPTION_KEEP], pa.int64())).as_py() or 0)
        self.texts += int(pc.sum(pc.list_value_length(table[schema.TEXTS])).as_py() or 0)

    def merge(self, counts: dict) -> None:
        """Add the counts of another shard (as `to_dict` wrote them)."""
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + counts[name])
        self.failed_by_reason.update(counts["failed_by_reason"])

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["failed_by_reason"] = dict(sorted(self.failed_by_reason.items()))
        return out


def totals(per_shard: dict[str, dict], last_run: dict) -> dict:
    """stats.json: the totals over every committed shard, their number, and the last run."""
    total = ShardCounts()
    for entry in per_shard.values():
        total.merge(entry["counts"])
    stats = total.to_dict()
    stats["shards"] = len(per_shard)
    stats["last_run"] = last_run
    return stats
