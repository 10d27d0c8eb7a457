"""`capfilt dedup`: near-duplicate removal and decontamination by ITC image embeddings.

Every image with an image is embedded with the filter's ITC image feature (vision_model ->
vision_proj on [CLS], normalised; `capfilt.model.blip_ops`), so cosine similarity is an inner
product and faiss `IndexFlatIP` answers it exactly.
1. Decontamination (`--against EVAL_DIR`): a row whose image is within `threshold` cosine of an
   evaluation image is removed with reason "contaminates:<eval key>" (the closest eval image).
   This runs first, so a contaminating row never stands in for a cluster of near-duplicates.
2. Near-duplicates: rows are visited in key order; a row not yet removed is kept and every LATER
   row within `threshold` of it is removed with reason "near_duplicate_of:<kept key>". No two kept
   rows are within `threshold` of each other, and of an exact-duplicate group the first key stays.
Rows without a usable image (failed downloads, undecodable bytes) cannot be compared: they are
kept as they are, counted in the stats, and `capfilt run` routes them to failed later.

Output, one file per input shard under the same name, schema of the input: `OUT/data/` the kept
rows, `OUT/removed/` the removed rows plus a `reason` column; `OUT/stats.json` with
read = kept + removed; the resolved `OUT/config.yaml`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from capfilt import schema
from capfilt.config import Config, write_resolved
from capfilt.embed import Blip, load_filter
from capfilt.images import ImageError, decode_image
from capfilt.model import blip_ops
from capfilt.model_folders import check_model_folder
from capfilt.storage import location, parquet_files

REASON = "reason"  # string column of OUT/removed: why the row was removed
REMOVED = "removed"  # output directory of removed rows


@dataclass
class Embedded:
    """ITC image features of the rows of a set of shards that have a usable image."""

    keys: list[str] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (file index, row index) per feature
    feats: list[np.ndarray] = field(default_factory=list)  # [B, E] batches
    unembedded: Counter = field(default_factory=Counter)  # reason -> rows without a feature
    read: int = 0

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.feats) if self.feats else np.zeros((0, 1), dtype=np.float32)


def embed_shards(files: list[Path], blip: Blip, cfg: Config) -> Embedded:
    """Read key, image and status of every shard and embed the decodable images in batches."""
    cols = cfg.run.columns
    out = Embedded()
    pending: list[tuple[int, int, str, Any]] = []

    def flush() -> None:
        if pending:
            _, feats = blip.image_features([img for *_, img in pending])
            out.feats.append(feats.float().cpu().numpy())
            out.where += [(f, r) for f, r, _, _ in pending]
            out.keys += [k for _, _, k, _ in pending]
            pending.clear()

    for f, path in enumerate(files):
        file_schema = path.read_schema()
        schema.require_columns(file_schema, {"key": cols.key, "image": cols.image}, str(path))
        names = [cols.key, cols.image] + ([cols.status] if cols.status in file_schema.names else [])
        for r, rec in enumerate(path.read_table(columns=names).to_pylist()):
            out.read += 1
            if rec.get(cols.status, schema.STATUS_SUCCESS) != schema.STATUS_SUCCESS:
                out.unembedded["download"] += 1
                continue
            try:
                image = decode_image(rec[cols.image], cfg.run.image)
            except ImageError:
                out.unembedded["decode"] += 1
                continue
            pending.append((f, r, rec[cols.key], image))
            if len(pending) == cfg.dedup.batch_size:
                flush()
    flush()
    return out


def contaminated(web: np.ndarray, evals: np.ndarray, eval_keys: list[str], threshold: float) -> dict[int, str]:
    """{web row: "contaminates:<key>"} for web rows within `threshold` of their closest eval image."""
    import faiss

    if web.shape[0] == 0 or evals.shape[0] == 0:
        return {}
    index = faiss.IndexFlatIP(evals.shape[1])
    index.add(np.ascontiguousarray(evals, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(web, dtype=np.float32), 1)  # [N, 1]
    close = np.flatnonzero(sims[:, 0] >= np.float32(threshold))  # compared in faiss's float32
    return {int(i): f"contaminates:{eval_keys[ids[i, 0]]}" for i in close}


def near_duplicates(feats: np.ndarray, keys: list[str], threshold: float, skip: set[int] | frozenset[int] = frozenset(),
                    query_batch: int = 4096) -> dict[int, str]:
    """{row: "near_duplicate_of:<key>"}: in key order, each surviving row removes later rows within
    `threshold` of it. Rows in `skip` (already removed) take no part."""
    import faiss

    order = [i for i in sorted(range(len(keys)), key=lambda i: keys[i]) if i not in skip]
    if len(order) < 2:
        return {}
    x = np.ascontiguousarray(feats[order], dtype=np.float32)  # rows in key order
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    removed: dict[int, int] = {}  # position in `order` -> position of the row it duplicates
    limit = np.float32(threshold)  # faiss computes in float32; so does the comparison
    radius = float(np.nextafter(limit, np.float32(-2)))  # range_search keeps scores strictly above it
    # Chunks are visited in key order, and a row only removes later rows, so the greedy pass over
    # chunked range searches equals one over the full similarity matrix.
    for start in range(0, len(order), query_batch):
        lims, sims, ids = index.range_search(x[start:start + query_batch], radius)
        for q in range(lims.size - 1):
            pos = start + q
            if pos in removed:
                continue
            hits = ids[lims[q]:lims[q + 1]]
            close = sims[lims[q]:lims[q + 1]] >= limit
            for other in hits[close]:
                if other > pos and int(other) not in removed:
                    removed[int(other)] = pos
    return {order[p]: f"near_duplicate_of:{keys[order[k]]}" for p, k in removed.items()}


def dedup(input_dir: str | Path, out_dir: str | Path, filter_dir: str | Path, cfg: Config,
          against: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Remove near-duplicates (and, with `against`, images of an evaluation set); returns the stats."""
    out_dir = Path(out_dir)
    threshold = cfg.dedup.threshold
    check_model_folder(filter_dir, "filter", "--filter")
    if not overwrite and any((out_dir / d).is_dir() and any((out_dir / d).iterdir()) for d in (schema.DATA, REMOVED)):
        raise FileExistsError(f"{out_dir} already holds dedup output; choose a new --out or pass --overwrite")
    files = parquet_files(input_dir)
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{input_dir}: shard names repeat")
    for path in files:
        if REASON in path.read_schema().names:
            raise ValueError(f"{path}: input column {REASON!r} collides with the column dedup writes")

    blip = load_filter(filter_dir, *blip_ops.pick_device(dtype="float32", device=cfg.device))
    web = embed_shards(files, blip, cfg)
    feats = web.matrix()
    reasons: dict[int, str] = {}  # feature row -> reason
    stats: dict[str, Any] = {"threshold": threshold}
    if against is not None:
        evals = embed_shards(parquet_files(against), blip, cfg)
        reasons |= contaminated(feats, evals.matrix(), evals.keys, threshold)
        stats["eval_images"] = len(evals.keys)
    reasons |= near_duplicates(feats, web.keys, threshold, skip=set(reasons), query_batch=cfg.dedup.query_batch)

    by_file: dict[int, dict[int, str]] = {}
    for row, reason in reasons.items():
        f, r = web.where[row]
        by_file.setdefault(f, {})[r] = reason
    kept = removed = 0
    per_shard = {}
    for f, path in enumerate(files):
        table = path.read_table()
        gone = by_file.get(f, {})
        keep_idx = [r for r in range(table.num_rows) if r not in gone]
        gone_idx = sorted(gone)
        location(out_dir / schema.DATA / path.name).write_table(table.take(pa.array(keep_idx, pa.int64())))
        removed_table = table.take(pa.array(gone_idx, pa.int64()))
        removed_table = removed_table.append_column(pa.field(REASON, pa.string()),
                                                    pa.array([gone[r] for r in gone_idx], pa.string()))
        location(out_dir / REMOVED / path.name).write_table(removed_table)
        kept += len(keep_idx)
        removed += len(gone_idx)
        per_shard[path.name] = {"read": table.num_rows, "kept": len(keep_idx), "removed": len(gone_idx)}
    if kept + removed != web.read:
        raise RuntimeError(f"dedup lost rows: read {web.read}, kept {kept}, removed {removed}")
    kinds = Counter(reason.split(":", 1)[0] for reason in reasons.values())
    stats |= {"read": web.read, "kept": kept, "removed": removed,
              "near_duplicate": kinds["near_duplicate_of"], "contaminated": kinds["contaminates"],
              "not_compared": dict(web.unembedded), "per_shard": per_shard}
    write_resolved(cfg, out_dir)
    location(out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
