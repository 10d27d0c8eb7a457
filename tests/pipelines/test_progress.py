"""The driver's progress line: the first one as soon as rows are done, not a whole period later."""

from __future__ import annotations

import logging
import time

from capfilt.pipelines.progress import Progress


def test_the_first_line_follows_the_first_rows_then_one_per_period():
    lines: list[str] = []
    log = logging.getLogger("capfilt.test_progress")
    log.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log.addHandler(handler)
    progress = Progress(10, 1, 3600.0, log)  # a period far longer than this test
    progress.start()
    try:
        time.sleep(1.5)
        assert lines == []  # nothing done yet: no line
        progress.staged(4, 3, 1, 0)
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lines and lines[0].startswith("progress: 4/10 rows (40.0%), 0/1 shards committed")
        progress.staged(6, 0, 6, 0)
        time.sleep(2.5)
        assert len(lines) == 1  # later lines wait for the period
    finally:
        progress.stop()
        log.removeHandler(handler)
    assert lines[-1].startswith("progress: 10/10 rows (100.0%)")
