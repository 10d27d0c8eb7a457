"""Done-markers: how capfilt records that a unit of work is finished, in one place.

A marker is a small JSON object written last, after every file it vouches for, and atomically
like them (capfilt/storage.py): it exists exactly when the unit is whole, so a crash before it
leaves the unit to be redone, and a re-run skips every unit that has one. The units:

    OUT/_commits/<shard>.json    a committed shard of `capfilt run` (capfilt/commit.py)
    DEST/_commits/<file>.json    an exported file of `capfilt export` (capfilt/export_pairs.py)
    STAGE/DONE.json              a finished stage or round of the bootstrap (pipelines/bootstrap.py)

Not markers of this kind: a download's `<shard>_stats.json` is img2dataset's own (it resumes
from them; capfilt/download.py uploads each one last), and a training checkpoint's `meta.json`
is a manifest that loading checks file by file (capfilt/model/train.py; model/ imports no capfilt).
"""

from __future__ import annotations

import json
from typing import Any

from capfilt.storage import Location


def mark_done(marker: Location, record: dict[str, Any]) -> None:
    """Write `record` as the marker: call it last, after every file it vouches for."""
    marker.write_bytes(json.dumps(record, sort_keys=True, default=str).encode())


def done_record(marker: Location) -> dict[str, Any] | None:
    """The marker's record, or None while its unit is not done."""
    return marker.read_json() if marker.is_file() else None
