"""`capfilt export` on Ray: a task per output file; the driver follows markers only.

    driver: source markers -> plan (capfilt/export_pairs.py) -> a Ray task per file not yet committed
    task (on a worker): read its samples from data/ -> write the file, its side files, its marker

The driver reads the source's commit markers (through its `stats_shards.parquet`) and one
footer, never a row: tasks read the data/ row groups they need and write their file themselves,
so the driver's cost grows with the number of files, not rows. Every export runs this way, a
small one on a local in-process Ray (started like `capfilt run`'s, on loopback), so there is one
code path. A task that fails (a storage error after `export.max_retries`, a worker that kept
dying, a row that cannot be written) leaves its file uncommitted; the others commit, the command
exits 1, and a re-run writes only what is missing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from capfilt import preflight, schema
from capfilt.commit import OutputLock
from capfilt.config import Config, write_resolved
from capfilt.export_pairs import RESOLVED_CONFIG, Plan, export_chunk, plan_export, prepare_destination, summarise
from capfilt.storage import Location
from capfilt.storage import configure as configure_storage

from .progress import Progress

log = logging.getLogger("capfilt.export")

COLLECT_SECONDS = 1.0  # how long the driver waits for finished tasks between looks at the others


def _write_files(plan: Plan, todo: list, config: Config, progress: Progress) -> tuple[dict[str, dict], dict[str, str]]:
    """Run a task per chunk in `todo`; returns the markers of those that committed and why the others did not."""
    import ray
    from ray.exceptions import RayError

    from .ray_env import task_args

    cfg = config.export
    task = ray.remote(export_chunk).options(**task_args(cfg.cpus_per_task), max_retries=cfg.max_retries,
                                            retry_exceptions=[OSError])
    target = ray.put(plan.target)
    pending = {task.remote(target, chunk): chunk for chunk in todo}
    committed, failed = {}, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=COLLECT_SECONDS, fetch_local=False)
        for ref in ready:
            chunk = pending.pop(ref)
            try:
                committed[chunk.name] = ray.get(ref)
            except RayError as err:
                failed[chunk.name] = str(err).strip().splitlines()[-1][:500]
                log.error("file %s was not written: %s", chunk.name, failed[chunk.name])
                continue
            progress.staged(chunk.samples, 0, 0, 0)
            progress.committed()
    return committed, failed


def run_export(config: Config, source: str | Path | Location, dest: str | Path | Location,
               force: bool = False) -> dict:
    """Export the kept rows of `source` (a `capfilt run` output) to `dest` as `config.export` says;
    returns the summary in `dest/_export.json`. Files already committed under the same identity are
    skipped: with nothing left to do, Ray is not started (`last_run.tasks_started` is False)."""
    from .ray_env import init_ray

    start = time.time()
    cfg = config.export
    configure_storage(config.storage)
    preflight.check(inputs={"OUT": f"{source}/{schema.DATA}"}, outputs={"--to": str(dest)})  # before Ray starts
    plan = plan_export(source, dest, cfg)
    plan.format.check()
    with OutputLock(plan.target.dest, command="capfilt export", option="--to"):
        committed = prepare_destination(plan, force)
        write_resolved(config, plan.target.dest, RESOLVED_CONFIG)
        todo = [chunk for chunk in plan.chunks if chunk.name not in committed]
        failed: dict[str, str] = {}
        progress = Progress(sum(c.samples for c in todo), len(todo), cfg.progress_seconds, log, rows="samples",
                            shards="files written", rate="samples/s", keep_rate=False)
        if todo:
            import ray

            started_ray = init_ray(cfg.address, num_cpus=None if cfg.address else os.cpu_count())
            progress.start()
            try:
                written, failed = _write_files(plan, todo, config, progress)
                committed.update(written)
            finally:
                progress.stop()
                if started_ray:
                    ray.shutdown()
        seconds = time.time() - start
        samples = sum(c.samples for c in todo if c.name in committed)
        last_run: dict[str, Any] = {
            "files_planned": len(plan.chunks), "files_skipped": len(plan.chunks) - len(todo),
            "files_written": len(todo) - len(failed), "files_failed": failed, "tasks_started": bool(todo),
            "samples_written": samples, "seconds": round(seconds, 3),
            "samples_per_second": round(samples / seconds, 3) if samples else 0.0,
        }
        return summarise(plan, committed, last_run)
