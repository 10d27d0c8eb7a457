"""Soak: `capfilt run` on CPU with a deliberately small object store; reports spilling and memory.

    python benchmarks/soak.py                                    # 3000 rows of 256 px noise JPEGs, 80 MB store
    python benchmarks/soak.py --rows 600 --object-store-mb 80    # the quick variant (the slow test runs this)

Input rows are noise JPEGs (incompressible, ~100 KB each at 256 px), so the read blocks alone
outgrow the object store and Ray has to spill them. While the run goes, a thread samples every
process of the Ray session (this driver and its descendants: GCS, raylet, workers) from /proc
every 0.5 s. Printed: rows/s, peak summed PSS (shared object-store pages counted once, split
between the processes mapping them), peak summed RSS (those pages counted per process), peak
driver RSS, bytes Ray reports spilled and restored, and whether stats.json reconciles. Exits 1
if it does not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from capfilt.config import load_config  # noqa: E402
from capfilt.pipelines.run import run_capfilt, start_ray  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def write_input(root: Path, rows: int, rows_per_shard: int, side: int) -> int:
    """img2dataset-style shards of noise JPEGs; returns the bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, rows, rows_per_shard):
        n = min(rows_per_shard, rows - start)
        images = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
        keys = [f"{start + i:09d}" for i in range(n)]
        pq.write_table(pa.table({"key": keys, "caption": [f"a photo of thing {k}" for k in keys],
                                 "jpg": pa.array(images, pa.binary()), "status": ["success"] * n}),
                       root / f"{start // rows_per_shard:05d}.parquet", row_group_size=n)
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        pss = int(re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)[1]) * 1024
        return rss, pss
    except (OSError, TypeError):
        return 0, 0


class Sampler(threading.Thread):
    """Peak memory of this process and all of its descendants, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"pss": 0, "rss": 0, "driver_rss": 0, "processes": 0}
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> None:
        tree, todo, pids = _children(), [os.getpid()], []
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += tree.get(pid, [])
        usage = [_memory(pid) for pid in pids]
        now = {"pss": sum(p for _, p in usage), "rss": sum(r for r, _ in usage), "driver_rss": usage[0][0],
               "processes": len(pids)}
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
        self.samples += 1

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def spill_summary() -> dict:
    """Spilled / restored MiB as Ray's memory summary reports them for this session."""
    import ray
    from ray._private.internal_api import memory_summary

    # This session's address: another Ray on the host would make the default ambiguous.
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = {}
    for name, pattern in (("spilled_mib", r"Spilled (\d+) MiB, (\d+) objects"),
                          ("restored_mib", r"Restored (\d+) MiB, (\d+) objects")):
        match = re.search(pattern, text)
        found[name] = int(match[1]) if match else 0
        found[name.replace("mib", "objects")] = int(match[2]) if match else 0
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--image-side", type=int, default=256, help="side of the noise JPEGs, in pixels")
    parser.add_argument("--object-store-mb", type=int, default=80, help="local Ray object store (Ray's floor is ~75)")
    parser.add_argument("--work", type=Path, default=None, help="folder for models, input and output")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-soak-"))
    models = save_models("tiny", work / "models-tiny")
    source = work / f"input-{args.rows}-{args.rows_per_shard}-{args.image_side}"
    if not source.is_dir():
        write_input(source, args.rows, args.rows_per_shard, args.image_side)
    input_bytes = sum(p.stat().st_size for p in source.glob("*.parquet"))
    cfg = load_config(None, [f"run.input={source}", f"run.caption.model={models['captioner']}",
                             f"run.filter.model={models['filter']}",
                             f"run.resources.object_store_memory={args.object_store_mb << 20}",
                             "run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25",
                             "run.caption.batch_size=16", "run.filter.batch_size=16",
                             "run.caption.max_length=8", "run.caption.min_length=2", *args.overrides])
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    sampler = Sampler()
    sampler.start()
    start_ray(cfg.run)
    start = time.perf_counter()
    stats = run_capfilt(cfg, out)
    seconds = time.perf_counter() - start
    spill = spill_summary()
    sampler.stop()

    reconciles = stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == args.rows
    mib = 1 << 20
    figures = {
        "rows": stats["read"], "kept": stats["kept"], "rejected": stats["rejected"], "failed": stats["failed"],
        "input_mib": round(input_bytes / mib, 1), "object_store_mib": args.object_store_mb,
        "seconds": round(seconds, 1), "rows_per_second": round(stats["read"] / seconds, 1),
        "peak_pss_mib": round(sampler.peak["pss"] / mib), "peak_rss_sum_mib": round(sampler.peak["rss"] / mib),
        "peak_driver_rss_mib": round(sampler.peak["driver_rss"] / mib), "processes": sampler.peak["processes"],
        "samples": sampler.samples, **spill, "reconciles": reconciles,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if not reconciles:
        sys.exit(1)


if __name__ == "__main__":
    main()
