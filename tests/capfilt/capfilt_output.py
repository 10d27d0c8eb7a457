"""A real `capfilt run` output folder in milliseconds: rows scored by hand, written by capfilt.commit.

The folder is what a run writes (data/, rejected/, failed/, _commits/, _identity.json,
stats.json, stats_shards.parquet), through the same `write_shard` and `Commits`; only the scores
and kept texts are chosen by the test instead of by models, so export tests know what to expect.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from capfilt import schema
from capfilt.commit import Commits, run_identity, write_shard
from capfilt.config import ColumnsConfig, load_config
from capfilt.shards import inspect_shard
from capfilt.storage import Location, location
from tests.tiny_blip import INPUT_SCHEMA, image_bytes, shard_rows, write_shard as write_input

OUTPUT_SCHEMA = schema.output_schema(INPUT_SCHEMA)


def scored_rows(prefix: str, texts: list[list[str] | None], seed: int) -> pa.Table:
    """One row per entry of `texts`: its kept texts ([] rejected, None failed); every third image is a PNG."""
    rows = shard_rows(prefix, len(texts), failed=0, corrupt=0, seed=seed)
    for i, row in enumerate(rows):
        if i % 3 == 2:
            row["jpg"] = image_bytes(seed * 1000 + i, fmt="PNG")
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    n = table.num_rows
    synthetic = [[f"synthetic {prefix} {i} a", f"synthetic {prefix} {i} b"] for i in range(n)]
    added = {
        schema.CAPTION_ITM: pa.array([0.9 if t else 0.1 for t in texts], pa.float32()),
        schema.CAPTION_ITC: pa.array([0.3] * n, pa.float32()),
        schema.CAPTION_KEEP: pa.array([bool(t) and t[0] == row["caption"] for t, row in zip(texts, rows)]),
        schema.SYNTHETIC: pa.array(synthetic),
        schema.SYNTHETIC_ITM: pa.array([[0.7, 0.2]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_ITC: pa.array([[0.3, 0.1]] * n, pa.list_(pa.float32())),
        schema.SYNTHETIC_KEEP: pa.array([[s in (t or []) for s in pair] for t, pair in zip(texts, synthetic)]),
        schema.TEXTS: pa.array(texts, pa.list_(pa.string())),
        schema.ERROR: pa.array([None if t is not None else "decode: corrupt" for t in texts], pa.string()),
        schema.ROUND: pa.array([1] * n, pa.int32()), schema.CAPTIONER: pa.array(["/models/c"] * n),
        schema.FILTER: pa.array(["/models/f"] * n), schema.THRESHOLD: pa.array([0.5] * n, pa.float32()),
        schema.KEEP_POLICY: pa.array(["both"] * n),
    }
    for name, array in added.items():
        table = table.append_column(name, array)
    return table


def texts_for(prefix: str, pattern: list[int | None]) -> list[list[str] | None]:
    """Kept texts from a pattern of counts per row (None: failed, 0: rejected): even rows keep their
    web caption first, odd rows synthetic captions only."""
    out = []
    for i, count in enumerate(pattern):
        first = [f"a photo of thing {i}"] if i % 2 == 0 else []
        out.append(None if count is None else (first + [f"synthetic {prefix} {i} a", f"synthetic {prefix} {i} b"]
                                               + [f"extra {prefix} {i} {k}" for k in range(count)])[:count])
    return out


def write_output(out: str | Path | Location, work: Path, shards: dict[str, list[int | None]]) -> Location:
    """A committed capfilt output at `out` with one shard per entry (a pattern of kept-text counts per row)."""
    for name in ("c", "f"):  # model folders, as far as the run identity looks at them
        (work / name).mkdir(parents=True, exist_ok=True)
        (work / name / "config.json").write_text("{}")
    cfg = load_config(None, [f"run.caption.model={work / 'c'}", f"run.filter.model={work / 'f'}"]).run
    out = location(out)
    commits = Commits(out)
    identity_key = commits.begin(run_identity(cfg))
    for seed, (name, pattern) in enumerate(sorted(shards.items())):
        table = scored_rows(name, texts_for(name, pattern), seed)
        shard = inspect_shard(write_input(work / "in" / f"{name}.parquet",
                                          table.select(INPUT_SCHEMA.names).to_pylist()), ColumnsConfig())
        write_shard(out, shard, table, OUTPUT_SCHEMA, identity_key)
    commits.write_stats(commits.stats(identity_key, {}))
    return out
