"""The driver's cost as rows grow, this design vs the previous one (the driver wrote every row).

    python benchmarks/bench_dataplane.py                          # 1,000 and 8,000 rows of ~60 KB JPEGs
    python benchmarks/bench_dataplane.py --rows 200 800 --skip-baseline

Each `capfilt run` is its own process (tiny random models, CPU, a local Ray it starts itself);
a sampler reads the driver process alone from /proc every 0.2 s: CPU seconds (user + system),
peak RSS, bytes it wrote (`write_bytes`, and `wchar` for every write call). Printed per design and
row count, with rows/s end to end. The baseline is the same command from an earlier commit of
this repository (`--baseline-ref`, default the last commit before workers wrote the output),
extracted with `git archive` and run from there, so both designs run in the same session on the
same inputs and models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import save_models  # noqa: E402
from benchmarks.soak import write_input  # noqa: E402

BASELINE_REF = "c7660a4"  # the driver-writes design (pipelines/run.py `_write_stream`)
SETTINGS = ["run.caption.max_length=5", "run.caption.min_length=2", "run.caption.batch_size=32",
            "run.filter.batch_size=32", "run.resources.cpus_per_actor=0.5", "run.resources.decode_cpus=0.25"]


def sample(pid: int, stop: threading.Event, into: dict) -> None:
    """CPU seconds, peak RSS and write bytes of process `pid`, until it exits or `stop` is set."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    while not stop.is_set():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            into["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            into["peak_rss_mb"] = max(into.get("peak_rss_mb", 0.0), rss / 2**20)
            io_ = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().split("\n") if line)
            into["write_mb"] = int(io_["write_bytes"]) / 2**20
            into["wchar_mb"] = int(io_["wchar"]) / 2**20
        except (OSError, ValueError, IndexError):  # exited between two reads
            return
        time.sleep(0.2)


def run(cli_root: Path, inputs: Path, models: dict, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "capfilt.cli", "run", "--input", str(inputs), "--captioner",
               str(models["captioner"]), "--filter", str(models["filter"]), "--out", str(out)]
    for item in SETTINGS:
        command += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(cli_root), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cli_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    figures: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, stop, figures), daemon=True)
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"capfilt run failed ({cli_root}):\n{output[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"]
    output_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20
    return {**figures, "seconds": round(seconds, 1), "rows_per_s": round(stats["read"] / seconds, 2),
            "output_mb": round(output_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--image-side", type=int, default=200, help="noise JPEGs of this side: 200 px ~ 60 KB")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-dataplane-"))
    models = save_models("tiny", work / "models")
    designs = {"workers write (this tree)": REPO}
    if not args.skip_baseline:
        baseline = work / f"baseline-{args.baseline_ref}"
        if not baseline.is_dir():
            baseline.mkdir(parents=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_ref], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        designs[f"driver writes ({args.baseline_ref})"] = baseline
    results = []
    for rows in args.rows:
        inputs = work / f"input-{rows}"
        if not inputs.is_dir():
            mb = write_input(inputs, rows, args.rows_per_shard, args.image_side) / 2**20
            print(f"input: {rows} rows, {mb:.0f} MB in {inputs}", flush=True)
        for name, root in designs.items():
            figures = run(root, inputs, models, work / "out")
            results.append({"design": name, "rows": rows, **figures})
            print(f"{name:28s} rows {rows:6d}  {figures['rows_per_s']:7.2f} rows/s  driver CPU "
                  f"{figures.get('cpu_s', float('nan')):6.1f} s  peak RSS {figures.get('peak_rss_mb', 0):7.0f} MB  "
                  f"wrote {figures.get('write_mb', 0):7.1f} MB (wchar {figures.get('wchar_mb', 0):7.1f} MB) "
                  f"of {figures['output_mb']:.0f} MB output", flush=True)
    if not args.skip_baseline:
        for rows in args.rows:
            ours, theirs = [r for r in results if r["rows"] == rows]
            print(f"rows {rows}: end-to-end rows/s ratio (workers write / driver writes) "
                  f"{ours['rows_per_s'] / theirs['rows_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
