"""The model actor's own CPU per image, step by step, in one process on one thread, no Ray.

    python benchmarks/actor_floor.py

bench_feed.py's models and JPEGs (tiny 384-px BLIPs, 512x384 photo-like JPEGs, 2-token captions):
one 64-image block through `DecodedImages.decode`, the normalisation, the captioner's and the
filter's `__call__` and the whole `CaptionAndFilter` call, each timed with `time.process_time`
over repeats, against the bare PIL decode + resize bench_feed divides by. Run it with the
actors' malloc settings (`pipelines.ray_env.ACTOR_MALLOC`) to see what an actor pays:

    env MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 \\
        python benchmarks/actor_floor.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_feed import SETTINGS, bare_decode_ms, photo_jpegs  # noqa: E402
from benchmarks.common import save_models  # noqa: E402
from capfilt import schema  # noqa: E402
from capfilt.config import load_config  # noqa: E402
from capfilt.images import DecodedImages  # noqa: E402
from capfilt.stages.common import usable_rows  # noqa: E402
from capfilt.stages.fused import CaptionAndFilter  # noqa: E402

BLOCK = 64  # images per actor call
REPEATS = 4


def per_image_ms(step, repeats: int = REPEATS) -> float:
    step()  # warm: first-call allocations and lazy initialisation
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats / BLOCK * 1e3


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        models = save_models("feed", Path(work) / "models")
        cfg = load_config(None, [f"run.caption.model={models['captioner']}", f"run.filter.model={models['filter']}",
                                 *SETTINGS])
        actor = CaptionAndFilter(cfg.run)
        jpegs = photo_jpegs(BLOCK)
        block = pa.table({schema.SHARD: ["00000"] * BLOCK, schema.ROW: list(range(BLOCK)),
                          "key": [f"k{i}" for i in range(BLOCK)], "jpg": jpegs, "caption": ["a photo"] * BLOCK,
                          schema.ERROR: pa.array([None] * BLOCK, pa.string())})
        rows = usable_rows(block, schema.ERROR)

        def decode() -> DecodedImages:
            return DecodedImages.decode(block["jpg"].to_pylist(), rows, actor.image_cfg, actor.sides)

        images = decode()
        spec, cpu = actor.filter.blip.spec, torch.device("cpu")

        def normalise() -> None:
            images._normalised.clear()
            images.tensor(images.rows, spec, cpu, torch.float32)

        figures = {"bare PIL decode + bicubic resize to 384": bare_decode_ms(jpegs, spec.size),
                   "DecodedImages.decode": per_image_ms(decode),
                   "normalisation (once for both models)": per_image_ms(normalise)}
        normalise()
        figures["captioner __call__"] = per_image_ms(lambda: actor.captioner(block, images))
        captioned = actor.captioner(block, images)
        figures["filter __call__"] = per_image_ms(lambda: actor.filter(captioned, images))
        figures["whole actor call"] = per_image_ms(lambda: actor(block))
    bare = figures["bare PIL decode + bicubic resize to 384"]
    for name, value in figures.items():
        print(f"{name:40s} {value:6.2f} core-ms  {value / bare:.2f}x")


if __name__ == "__main__":
    main()
