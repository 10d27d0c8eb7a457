"""The whole `capfilt run`, parquet to parquet, on a local Ray; prints images/s.

    python benchmarks/bench_run.py                               # demo-world web rows, tiny random BLIP
    python benchmarks/bench_run.py --size base --rows 20000      # BLIP-base at 384 px (GPU machine)
    python benchmarks/bench_run.py --input /data/web --size base --set run.resources.captioner_actors=3

Ray is started before the clock starts; the time covers the pipeline, including actor start-up
and model loading (paid once per run). The output folder is fresh each time, so nothing is
skipped. Any `--set run.x=y` reaches the run's config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from capfilt.config import DemoConfig, load_config  # noqa: E402
from capfilt.pipelines.run import run_capfilt, start_ray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="input shards (default: a generated demo-world web split)")
    parser.add_argument("--rows", type=int, default=400, help="demo-world web rows when --input is not given")
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--work", type=Path, default=None, help="folder for models, input and output")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-bench-run-"))
    models = save_models(args.size, work / f"models-{args.size}")
    source = args.input
    if source is None:
        from capfilt.demo_world import write_world

        demo = DemoConfig(num_human=0, num_web=args.rows, num_test=0, rows_per_shard=max(1, args.rows // 4))
        write_world(demo, work / "demo", overwrite=True)
        source = str(work / "demo" / "web")
    cfg = load_config(None, [f"run.input={source}", f"run.caption.model={models['captioner']}",
                             f"run.filter.model={models['filter']}", *args.overrides])
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    start_ray(cfg.run)
    start = time.perf_counter()
    stats = run_capfilt(cfg, out)
    seconds = time.perf_counter() - start
    rows = stats["last_run"]["rows_through_models"]
    print(f"size {args.size}  rows {stats['read']} (kept {stats['kept']}, rejected {stats['rejected']}, "
          f"failed {stats['failed']})  shards {stats['shards']}")
    print(f"capfilt run: {seconds:.1f} s, {rows / seconds:.1f} images/s end to end "
          f"(actor start-up and model loading included)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "size": args.size, "rows_read": stats["read"], "kept": stats["kept"], "rejected": stats["rejected"],
            "failed": stats["failed"], "shards": stats["shards"], "rows_through_models": rows,
            "seconds": seconds, "images_per_second": rows / seconds, "overrides": args.overrides}, indent=2))


if __name__ == "__main__":
    main()
