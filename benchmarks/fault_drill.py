"""Fault drill: `capfilt run` as separate processes, with and without real process deaths.

    python benchmarks/fault_drill.py                       # 800 demo-world web rows, 8 shards, tiny BLIP
    python benchmarks/fault_drill.py --rows 4000 --shards 20 --size base   # on a GPU machine

Four runs of the same command over the same input, each into a fresh folder:
  clean    uninterrupted: the reference output
  actors   CAPFILT_CHAOS kills a captioner and a filter process mid-batch, once each
  driver   the driver is SIGKILLed after its first committed shard, then the command is re-run
  dying    every captioner process dies on its 2nd batch: the run must stop, with a clear message
It prints seconds per run and checks each finished output against `clean`, file for file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import save_models  # noqa: E402
from capfilt import schema  # noqa: E402
from capfilt.config import DemoConfig  # noqa: E402


def outputs(out: Path) -> dict[str, object]:
    return {str(p.relative_to(out)): pq.read_table(p)
            for d in schema.OUTPUT_DIRS for p in sorted((out / d).glob("*.parquet"))}


def compare(out: Path, reference: Path) -> str:
    got, want = outputs(out), outputs(reference)
    same = sorted(got) == sorted(want) and all(got[k].equals(want[k]) for k in want)
    keys = [k for t in got.values() for k in t["key"].to_pylist()]
    return f"{len(keys)} rows, {len(set(keys))} distinct keys, output {'==' if same else '!='} clean run"


def committed(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-fault-drill-"))
    models = save_models(args.size, work / f"models-{args.size}")
    from capfilt.demo_world import write_world

    write_world(DemoConfig(num_human=0, num_web=args.rows, num_test=0, rows_per_shard=args.rows // args.shards),
                work / "demo", overwrite=True)
    # One parquet file per Ray read unit, so that small shards commit one by one as large ones do.
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def command(out: Path, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "capfilt.cli", "run", "--input", str(work / "demo" / "web"), "--captioner",
               str(models["captioner"]), "--filter", str(models["filter"]), "--out", str(out)]
        for item in (*args.overrides, *extra):
            cmd += ["--set", item]
        return cmd

    def run(name: str, *extra: str, chaos: str = "") -> tuple[float, subprocess.CompletedProcess]:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"chaos-{name}", ignore_errors=True)
        (work / f"chaos-{name}").mkdir()
        run_env = dict(env, CAPFILT_CHAOS=chaos, CAPFILT_CHAOS_DIR=str(work / f"chaos-{name}")) if chaos else env
        start = time.perf_counter()
        done = subprocess.run(command(out, *extra), env=run_env, capture_output=True, text=True)
        return time.perf_counter() - start, done

    def deaths(name: str) -> int:
        return sum(len(p.read_text().split()) for p in (work / f"chaos-{name}").glob("*.fired"))

    seconds, done = run("clean")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"clean   {seconds:6.1f} s  {compare(work / 'clean', work / 'clean')}")

    seconds, done = run("actors", chaos="caption:3,filter:5")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"actors  {seconds:6.1f} s  {deaths('actors')} actor deaths  {compare(work / 'actors', work / 'clean')}")

    out = work / "driver"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    driver = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    while committed(out) == 0 and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    at_kill, first = committed(out), time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run(command(out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = json.loads((out / "stats.json").read_text())["last_run"]["shards_skipped"]
    print(f"driver  {first:6.1f} s to the kill ({at_kill}/{args.shards} shards committed), re-run "
          f"{time.perf_counter() - start:.1f} s skipping {skipped}  {compare(out, work / 'clean')}")

    seconds, done = run("dying", chaos="caption:2:always")
    message = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "(no error line)")
    print(f"dying   {seconds:6.1f} s to exit code {done.returncode}, {deaths('dying')} captioner deaths: "
          f"{message[:240]}")


if __name__ == "__main__":
    main()
