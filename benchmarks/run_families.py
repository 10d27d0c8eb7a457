"""`capfilt run` end to end with every captioner family and every scorer family: tiny random
models (tests/model/tiny_models.py, nothing downloaded) on the demo world's web shards, local Ray.

Each run is the command a user types (printed before it runs); the script prints the run's
summary line and checks its stats.json: read = kept + rejected + failed, every input key
written once. Evidence that each family runs through the whole pipeline, not a speed figure.

    python benchmarks/run_families.py --work /tmp/families [--only qwen2_vl clip]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from tests.model import tiny_models  # noqa: E402

SCORERS = {"clip": tiny_models.clip_dir, "siglip": tiny_models.siglip_dir, "siglip2": tiny_models.siglip2_dir}


def capfilt(*args: str) -> str:
    """Runs `capfilt ARGS` as a user would; its console output (stops the script if it fails)."""
    command = [str(Path(sys.executable).with_name("capfilt")), *args]
    print("$ " + shlex.join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def keys(folder: Path) -> list[str]:
    return sorted(k for path in sorted(folder.rglob("*.parquet")) for k in pq.read_table(path, columns=["key"])
                  ["key"].to_pylist())


def report(out: Path, web: Path, console: str) -> None:
    """The run's own summary lines, and its accounting checked against the input."""
    stats = json.loads((out / "stats.json").read_text())
    for line in console.splitlines():
        if line.startswith(("read ", "failed by reason", "synthetic captions", "this run")):
            print("  " + line)
    written = sorted(k for dest in ("data", "rejected", "failed") for k in keys(out / dest)) \
        if (out / "data").exists() else []
    balanced = stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"]
    once = written == keys(web)
    print(f"  stats: read {stats['read']} kept {stats['kept']} rejected {stats['rejected']} failed "
          f"{stats['failed']} ({'reconciles' if balanced else 'DOES NOT reconcile'}); every input key written "
          f"{'once' if once else 'NOT once'}\n", flush=True)
    if not (balanced and once):
        sys.exit(f"{out}: the accounting does not hold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the world, the models and the runs")
    parser.add_argument("--only", nargs="*", default=None, help="families to run (default: all)")
    args = parser.parse_args()
    work = args.work.resolve()
    names = args.only or [*tiny_models.CAPTIONERS, *SCORERS]
    world = work / "world"
    if not (world / "web").exists():
        capfilt("demo-data", str(world))
    web = world / "web"
    blip = save_models("tiny", work / "models" / "blip")
    for name in names:
        folder = work / "models" / name
        if name in SCORERS:
            SCORERS[name](folder)
            # The scorer is the filter: BLIP-free, its threshold decides (a cosine for CLIP).
            extra = ["--captioner", str(blip["captioner"]), "--filter", str(folder), "--threshold", "0.0"]
        else:
            build, prompt = tiny_models.CAPTIONERS[name]
            build(folder)
            extra = ["--captioner", str(folder), "--filter", str(blip["filter"]), "--set",
                     f"run.caption.prompt={prompt}"]
        out = work / "runs" / name
        console = capfilt("run", "--input", str(web), "--out", str(out), "--num-captions", "2",
                          "--set", "run.caption.max_length=8", *extra)
        report(out, web, console)


if __name__ == "__main__":
    main()
