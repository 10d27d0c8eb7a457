"""`capfilt run` on S3 through injected faults: what they cost, and that they cost nothing else.

    python benchmarks/s3_faults.py                      # 400 rows of ~60 KB JPEGs in 4 shards, tiny models
    python benchmarks/s3_faults.py --rates 0.1 0.3 --rows 800

A moto S3 server on loopback, the fault proxy of the tests (tests/s3_fault_proxy.py) in front of
it, and `capfilt run --input s3://B/in --out s3://B/<run>` as a user runs it (its own process and
local Ray, the proxy as AWS_ENDPOINT_URL). First a run without faults, then one run per fault rate:
that share of all requests (every method, every key) answered 503 SlowDown, 500 InternalError, a
connection reset after half the answer, or a 0.5 s delay, in the proportions 4:3:2:1. The last
rate is also run with pyarrow's own request retries off (storage.request_attempts=1), so capfilt's
retries carry it alone. Printed per run: wall time, requests seen, faults injected per kind,
capfilt's retries (its `storage retry` warnings, from every worker), exit status, and whether the
data/rejected/failed files are byte-identical to the fault-free run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_dataplane import SETTINGS  # noqa: E402
from benchmarks.common import save_models  # noqa: E402
from benchmarks.soak import write_input  # noqa: E402
from tests.s3_fault_proxy import FaultProxy, Rule  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

MIX = {"slowdown": 0.4, "internal": 0.3, "reset": 0.2, "delay": 0.1}  # shares of the faults, by kind


def capfilt_run(bucket: str, out: str, models: dict, env: dict, extra: list[str]) -> tuple[float, int, str]:
    command = [sys.executable, "-m", "capfilt.cli", "run", "--input", f"s3://{bucket}/in", "--out",
               f"s3://{bucket}/{out}", "--captioner", str(models["captioner"]), "--filter", str(models["filter"])]
    for item in (*SETTINGS, *extra):
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.returncode, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rows-per-shard", type=int, default=100)
    parser.add_argument("--image-side", type=int, default=200, help="noise JPEGs of this side: 200 px ~ 60 KB")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3], help="shares of requests that fail")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="capfilt-s3-faults-"))
    models = save_models("tiny", work / "models")
    write_input(work / "in", args.rows, args.rows_per_shard, args.image_side)
    server = S3Server()
    proxy = FaultProxy(server.endpoint, seed=args.seed)
    try:
        os.environ.update(server.environment())
        from capfilt.storage import location

        bucket = server.bucket()
        for path in sorted((work / "in").glob("*.parquet")):
            (location(f"s3://{bucket}/in") / path.name).write_bytes(path.read_bytes())
        env = dict(os.environ, AWS_ENDPOINT_URL=proxy.endpoint, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", RAY_DEDUP_LOGS="0")  # every worker's retry warning, not a summary
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint

        def files(out: str) -> dict[str, bytes]:
            root = location(f"s3://{bucket}/{out}")
            return {f"{d}/{i.base_name}": root.at(i).read_bytes() for d in ("data", "rejected", "failed")
                    for i in (root / d).files(".parquet")}

        runs = [("clean", 0.0, [])] + [(f"faults {rate:.0%}", rate, []) for rate in args.rates]
        runs.append((f"faults {args.rates[-1]:.0%}, request_attempts=1", args.rates[-1],
                     ["storage.request_attempts=1"]))
        results, reference = [], None
        print(f"input: {args.rows} rows in {args.rows // args.rows_per_shard} shards; endpoint {proxy.endpoint} "
              f"-> moto {server.endpoint}", flush=True)
        for index, (name, rate, extra) in enumerate(runs):
            proxy.rules = [Rule({kind: rate * share for kind, share in MIX.items()}, delay_s=0.5)] if rate else []
            proxy.reset_counts()
            out = f"out{index}"
            seconds, code, log = capfilt_run(bucket, out, models, env, extra)
            proxy.rules = []
            got = files(out) if code == 0 else {}
            reference = reference if reference is not None else got
            row = {"run": name, "seconds": round(seconds, 1), "exit": code, "requests": proxy.counts["requests"],
                   **{kind: proxy.counts[kind] for kind in MIX}, "faults": proxy.faults,
                   "capfilt_retries": log.count("storage retry"),
                   "identical": bool(got) and got == reference, "files": len(got)}
            results.append(row)
            print(json.dumps(row), flush=True)
            if code:
                print(log[-3000:])
        print("\n| run | wall | requests | 503 SlowDown | 500 | reset | delay | capfilt retries | exit | output |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['run']} | {r['seconds']} s | {r['requests']} | {r['slowdown']} | {r['internal']} | "
                  f"{r['reset']} | {r['delay']} | {r['capfilt_retries']} | {r['exit']} | "
                  f"{'identical' if r['identical'] else 'DIFFERENT'} ({r['files']} files) |")
    finally:
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
