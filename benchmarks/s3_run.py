"""`capfilt run` with input and output on S3: a real S3 API server (moto) on loopback.

    python benchmarks/s3_run.py                 # 400 rows of ~60 KB JPEGs in 4 shards, tiny models
    python benchmarks/s3_run.py --rows 2000 --rows-per-shard 500

The input shards are uploaded to `s3://BUCKET/in`; `capfilt run --input s3://BUCKET/in --out
s3://BUCKET/out` runs as a user would run it (its own process and local Ray; the endpoint and keys
come from the environment, as `AWS_ENDPOINT_URL` etc. would for MinIO). Printed: the run's counts and
rows/s, the objects it wrote per folder, a re-run (nothing to do: no Ray, no model), and the
same run into a local folder, whose data/rejected/failed files must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_dataplane import SETTINGS  # noqa: E402
from benchmarks.common import save_models  # noqa: E402
from benchmarks.soak import write_input  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402


def capfilt_run(inputs: str, out: str, models: dict, env: dict) -> tuple[float, str]:
    command = [sys.executable, "-m", "capfilt.cli", "run", "--input", inputs, "--out", out,
               "--captioner", str(models["captioner"]), "--filter", str(models["filter"])]
    for item in SETTINGS:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"capfilt run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rows-per-shard", type=int, default=100)
    parser.add_argument("--image-side", type=int, default=200, help="noise JPEGs of this side: 200 px ~ 60 KB")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="capfilt-s3-"))
    models = save_models("tiny", work / "models")
    mb = write_input(work / "in", args.rows, args.rows_per_shard, args.image_side) / 2**20
    server = S3Server()
    try:
        os.environ.update(server.environment())
        from capfilt.storage import location

        bucket = server.bucket()
        for path in sorted((work / "in").glob("*.parquet")):
            (location(f"s3://{bucket}/in") / path.name).write_bytes(path.read_bytes())
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        print(f"input: {args.rows} rows, {mb:.0f} MB in {args.rows // args.rows_per_shard} shards at s3://{bucket}/in "
              f"(endpoint {server.endpoint})", flush=True)

        seconds, _ = capfilt_run(f"s3://{bucket}/in", f"s3://{bucket}/out", models, env)
        out = location(f"s3://{bucket}/out")
        stats = (out / "stats.json").read_json()
        import pyarrow.fs as pafs

        listed = out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True))
        objects = Counter(info.path[len(out.path) + 1:].split("/")[0] for info in listed
                          if info.type == pafs.FileType.File)
        print(f"s3 run: {seconds:.1f} s, {stats['read'] / seconds:.2f} rows/s end to end; read {stats['read']} "
              f"kept {stats['kept']} rejected {stats['rejected']} failed {stats['failed']} "
              "(kept + rejected + failed = read: "
              f"{stats['read'] == stats['kept'] + stats['rejected'] + stats['failed']})")
        print("objects written: " + ", ".join(f"{name} {n}" for name, n in sorted(objects.items())))

        again, _ = capfilt_run(f"s3://{bucket}/in", f"s3://{bucket}/out", models, env)
        last = (out / "stats.json").read_json()["last_run"]
        print(f"re-run: {again:.1f} s, pipeline started {last['pipeline_started']}, "
              f"{last['shards_skipped']} of {last['shards_listed']} shards skipped")

        local = work / "local-out"
        local_s, _ = capfilt_run(f"s3://{bucket}/in", str(local), models, env)
        same = all((out / folder / p.name).read_bytes() == p.read_bytes()
                   for folder in ("data", "rejected", "failed") for p in sorted((local / folder).glob("*.parquet")))
        count = sum(1 for folder in ("data", "rejected", "failed") for _ in (local / folder).glob("*.parquet"))
        print(f"local output ({local_s:.1f} s): {count} files, byte-identical to the S3 output: {same}")
        print(json.dumps({"rows": args.rows, "s3_seconds": round(seconds, 1), "rerun_seconds": round(again, 1),
                          "local_seconds": round(local_s, 1), "identical": same, "objects": dict(objects)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
