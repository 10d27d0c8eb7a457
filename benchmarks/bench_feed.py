"""The CPU side of `capfilt run` per image, against a bare PIL decode + resize of the same bytes.

    python benchmarks/bench_feed.py                            # 400 and 2,000 rows, HEAD and 57400ae
    python benchmarks/bench_feed.py --rows 200 1000 --skip-baseline

Tiny 384-px BLIP checkpoints (a ViT of 12x12 patches of 32 px and a text tower of width 64, 2 layers each, random
weights: the models' own compute is small) caption (2 new tokens, `run.caption.max_length=2`) and
score 512x384 photo-like JPEGs of ~63 KB. Each design runs `capfilt run` as a new user does
(defaults otherwise, a local Ray it starts itself) on two input sizes; the difference between the
two runs, divided by the difference in rows, is the marginal cost of one image, so Ray's start-up
and model loading cancel out. Figures per design:

- machine-wide busy CPU per extra image (core-ms, from /proc/stat: what a host must provide),
  and the same summed over the run's own processes (driver, Ray and its workers), which other
  work on the machine does not disturb;
- that cost as a multiple of a bare PIL decode + bicubic resize to 384 of the same bytes, timed
  in this process on one thread in the same invocation;
- the marginal CPU split by process role (model actor, read+prepare tasks, keep policy + staging,
  commit, driver, Ray's own daemons), read from the workers' process titles every 0.1 s;
- wall seconds per extra image, and the bytes Ray Data's operators put in the object store per
  image (`stats.json` `last_run.block_bytes`, where the design records them) against the JPEG bytes;
- whether the two designs wrote byte-identical output files.

Both designs are commits (`--ref`, default HEAD, and `--baseline-ref`, the commit before the model
actors decoded the images themselves), extracted with `git archive` and run the same way, in the
same invocation, on the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import save_models  # noqa: E402
from benchmarks.soak import _children  # noqa: E402
from capfilt.model.images import decode_image  # noqa: E402

BASELINE_REF = "57400ae"  # pixels through the object store, a decode stage, every input column carried
SETTINGS = ["run.caption.max_length=2", "run.caption.min_length=1"]
ROLES = [  # process title pattern -> role; the first match wins
    (r"CaptionAndFilter|Captioner|Filter\)", "model actor"),
    (r"commit_shard|commit_whole", "commit"),
    (r"KeepPolicy|StageParts", "policy+staging"),
    (r"ReadUnits|Prepare|Decode|FromItems|ReadRange", "read+prepare"),
    (r"raylet|gcs_server|dashboard|log_monitor|runtime_env|monitor\.py|ray::IDLE|default_worker", "ray daemons+idle"),
]


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """512x384 JPEGs (quality 90, ~63 KB): smooth colour fields plus sensor-like noise, as photos compress."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((512, 384), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_inputs(root: Path, images: list[bytes], rows_per_shard: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), rows_per_shard):
        chunk = images[start : start + rows_per_shard]
        keys = [f"{start + i:09d}" for i in range(len(chunk))]
        pq.write_table(pa.table({"key": keys, "caption": [f"a photo of thing {k}" for k in keys],
                                 "url": [f"http://example.invalid/{k}.jpg" for k in keys],
                                 "jpg": pa.array(chunk, pa.binary()), "status": ["success"] * len(chunk),
                                 "width": [512] * len(chunk), "height": [384] * len(chunk)}),
                       root / f"{start // rows_per_shard:05d}.parquet", row_group_size=64)


def bare_decode_ms(images: list[bytes], side: int) -> float:
    """CPU ms per image of PIL decode + bicubic resize to `side`, this process, one thread."""
    started = time.process_time()
    for data in images:
        Image.open(io.BytesIO(data)).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).tobytes()
    return (time.process_time() - started) * 1000 / len(images)


def busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def descendants(root: int) -> list[int]:
    children = _children()  # ppid -> pids, from /proc (benchmarks/soak.py)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return next((name for pattern, name in ROLES if re.search(pattern, title)), "other")


def sample(driver: int, stop: threading.Event, split: dict[str, float]) -> None:
    """CPU seconds of the run's process tree by role: each 0.1 s delta goes to the title seen then."""
    ticks = os.sysconf("SC_CLK_TCK")
    last: dict[int, int] = {}
    while not stop.is_set():
        for pid in descendants(driver):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            used = int(fields[11]) + int(fields[12])
            delta = used - last.get(pid, 0)
            last[pid] = used
            if delta:
                name = role(pid, driver)
                split[name] = split.get(name, 0.0) + delta / ticks
        time.sleep(0.1)


def capfilt_run(root: Path, inputs: Path, models: dict, out: Path, settings: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "capfilt.cli", "run", "--input", str(inputs), "--captioner",
               str(models["captioner"]), "--filter", str(models["filter"]), "--out", str(out)]
    for item in settings:
        command += ["--set", item]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    busy, started = busy_jiffies(), time.perf_counter()
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    split: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, stop, split), daemon=True)
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - started
    machine = (busy_jiffies() - busy) / os.sysconf("SC_CLK_TCK")
    if process.returncode != 0:
        sys.exit(f"capfilt run failed ({root}):\n{output[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"]
    digests = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
               for dest in ("data", "rejected", "failed") for p in sorted((out / dest).glob("*.parquet"))}
    return {"rows": stats["read"], "failed": stats["failed"], "seconds": seconds, "machine_cpu_s": machine,
            "tree_cpu_s": sum(split.values()), "split": split, "digests": digests,
            "block_bytes": stats["last_run"].get("block_bytes")}


def design_tree(work: Path, ref: str) -> Path:
    """`ref` extracted, with `capfilt.model` and `capfilt.pipelines` where an installed package has them."""
    ref = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    root = work / f"tree-{ref}"
    if not root.is_dir():
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        for name in ("model", "pipelines"):  # else the editable install's finder serves this tree's
            (root / "capfilt" / name).symlink_to(root / name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[400, 2000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--rows-per-shard", type=int, default=200)
    parser.add_argument("--ref", default="HEAD", help="the design measured (a commit: both run from `git archive`)")
    parser.add_argument("--tree", type=Path, default=None,
                        help="measure this folder as it is instead of --ref (a copy without .git, e.g. on a GPU host)")
    parser.add_argument("--size", default="feed", help="model size from benchmarks/common.py (base: BLIP-base)")
    parser.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                        help="more run settings, e.g. run.resources.decode_on_device=true")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-feed-"))
    models = save_models(args.size, work / f"models-{args.size}")
    images = photo_jpegs(args.rows[1])
    jpeg_bytes = sum(map(len, images)) / len(images)
    for rows in args.rows:
        if not (work / f"input-{rows}").is_dir():
            write_inputs(work / f"input-{rows}", images[:rows], args.rows_per_shard)
    assert all(decode_image(data).size == (512, 384) for data in images[:4])
    bare = bare_decode_ms(images, 384)
    print(f"{len(images)} JPEGs of {jpeg_bytes / 1e3:.1f} KB mean; bare PIL decode + bicubic resize to 384: "
          f"{bare:.2f} core-ms per image (this process, one thread)", flush=True)

    settings = SETTINGS + args.settings
    designs = {str(args.tree): args.tree.resolve()} if args.tree else {args.ref: design_tree(work, args.ref)}
    if not (args.skip_baseline or args.tree):
        designs[args.baseline_ref] = design_tree(work, args.baseline_ref)
    report = {"bare_decode_ms": bare, "jpeg_bytes": jpeg_bytes, "designs": {}}
    for name, root in designs.items():
        small, large = (capfilt_run(root, work / f"input-{rows}", models, work / f"out-{root.name}-{rows}", settings)
                        for rows in args.rows)
        extra = large["rows"] - small["rows"]
        machine = (large["machine_cpu_s"] - small["machine_cpu_s"]) * 1000 / extra
        tree = (large["tree_cpu_s"] - small["tree_cpu_s"]) * 1000 / extra
        wall = (large["seconds"] - small["seconds"]) * 1000 / extra
        split = {k: (large["split"].get(k, 0) - small["split"].get(k, 0)) * 1000 / extra
                 for k in sorted(set(large["split"]) | set(small["split"]))}
        block = large["block_bytes"]
        per_image = sum(block.values()) / large["rows"] if block else None
        figures = {"machine_ms": machine, "tree_ms": tree, "ratio_machine": machine / bare, "ratio_tree": tree / bare,
                   "wall_ms": wall, "split_ms": split, "block_bytes": block, "block_bytes_per_image": per_image,
                   "digests": large["digests"], "runs": {r["rows"]: {k: v for k, v in r.items() if k != "digests"}
                                                         for r in (small, large)}}
        report["designs"][name] = figures
        store = (f"{per_image / 1e3:.0f} KB = {per_image / jpeg_bytes:.2f}x the JPEG" if per_image
                 else "not recorded")
        images_per_s = extra / (large["seconds"] - small["seconds"])
        figures["images_per_s"] = images_per_s
        print(f"\n{name}: {images_per_s:.1f} images/s marginal; per extra image: machine CPU {machine:.1f} core-ms "
              f"({machine / bare:.2f}x bare decode), run's processes {tree:.1f} core-ms ({tree / bare:.2f}x), "
              f"wall {wall:.1f} ms; object store {store}")
        for key, value in split.items():
            print(f"    {key:18s} {value:6.2f} core-ms")
        if block:
            for op, size in block.items():
                print(f"    block bytes {op}: {size / large['rows'] / 1e3:.1f} KB per image")
    if len(designs) == 2:
        ours, theirs = report["designs"].values()
        same = ours["digests"] == theirs["digests"]
        report["byte_identical"] = same
        print(f"\nmachine CPU per image, baseline / this tree: {theirs['machine_ms'] / ours['machine_ms']:.2f}x; "
              f"run's processes: {theirs['tree_ms'] / ours['tree_ms']:.2f}x; output files byte-identical: "
              f"{'yes' if same else 'NO'} ({len(ours['digests'])} files)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
