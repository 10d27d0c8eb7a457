"""The driver's progress line: rows and shards done of the totals in the footers, speed, ETA, keep rate.

One plain log line as soon as the first rows are done, then one every
`run.resources.progress_seconds` (and a last one at the end), written by a background thread so
that it keeps coming while actors load or a long block runs. Plain lines read the same in a
terminal and in `ray job logs`, where progress bars turn into noise.
"""

from __future__ import annotations

import logging
import threading
import time

TICK_S = 1.0  # how often the thread looks for the first rows: the first line comes this soon after them

def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counters the driver updates from the staged parts and commits; `line()` formats them.

    The words default to `capfilt run`'s; `capfilt export` counts samples and files written, and
    has no keep rate to show.
    """

    def __init__(self, total_rows: int, total_shards: int, every_s: float, log: logging.Logger, *,
                 rows: str = "rows", shards: str = "shards committed", rate: str = "img/s", keep_rate: bool = True):
        self.total_rows, self.total_shards, self.every_s, self.log = total_rows, total_shards, every_s, log
        self.words = {"rows": rows, "shards": shards, "rate": rate}
        self.keep_rate = keep_rate
        self.rows = self.kept = self.scored = self.shards = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def staged(self, rows: int, kept: int, rejected: int, failed: int) -> None:
        with self._lock:
            self.rows += rows
            self.kept += kept
            self.scored += kept + rejected

    def committed(self) -> None:
        with self._lock:
            self.shards += 1

    def line(self) -> str:
        with self._lock:
            rows, kept, scored, shards = self.rows, self.kept, self.scored, self.shards
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = rows / elapsed
        share = f"{100 * rows / self.total_rows:.1f}%" if self.total_rows else "-"
        eta = _duration((self.total_rows - rows) / rate) if rate > 0 and rows < self.total_rows else "-"
        words = self.words
        line = (f"progress: {rows:,}/{self.total_rows:,} {words['rows']} ({share}), {shards}/{self.total_shards} "
                f"{words['shards']}, {rate:.1f} {words['rate']}, ETA {eta}")
        if self.keep_rate:
            line += f", kept {f'{100 * kept / scored:.1f}%' if scored else '-'} of scored rows"
        return line

    def _run(self) -> None:
        first, last = True, time.monotonic()
        while not self._stop.wait(min(TICK_S, self.every_s)):
            with self._lock:
                started = self.rows > 0
            if (first and started) or time.monotonic() - last >= self.every_s:
                self.log.info(self.line())
                first, last = first and not started, time.monotonic()

    def start(self) -> None:
        self.started = time.monotonic()
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="capfilt-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.log.info(self.line())
