"""`capfilt select`: re-filter a finished run's stored scores with other keep settings, no model.

A run stores every score (`caption_itm`, `synthetic_itm`, ..., `score_<name>`), so new
thresholds, keep rules or top-k are a CPU pass over its output: each committed shard's rows
(`data/`, `rejected/` and `failed/` together) go through the same keep policy
(`capfilt.stages.policy.KeepPolicy`) with the new settings and are written through the same
commit protocol as `capfilt run` (capfilt/commit.py: three files, then the marker; an output
lock; shards committed with the same identity are skipped, so a stopped select resumes). The
destination's identity is the source's with the new settings, so its rows and identity are what
`capfilt run` with those settings writes.

Only the keep settings may change (`SELECTABLE`, and each scorer's threshold); anything else
(a model, the captions) needs a new `capfilt run`. Rows are put back in input order from the
input shard's key column (the output files are in input order each, but a row may move between
them).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.commit import (IDENTITY, MODELS, Commits, OutputLock, differences, identity_key_of, run_settings,
                            write_shard)
from capfilt.config import Config, load_config, write_resolved
from capfilt.shards import Shard
from capfilt.storage import Location, location

# The settings `select` may change: they decide which stored texts are kept, from stored scores.
SELECTABLE = ("filter.threshold", "filter.keep", "filter.top_k_synthetic", "filter.rank_synthetic_by")

# The columns the keep policy writes (recomputed), besides the provenance it adds.
DECIDED = (schema.CAPTION_KEEP, schema.SYNTHETIC_KEEP, schema.TEXTS, schema.ROUND, schema.CAPTIONER, schema.FILTER,
           schema.THRESHOLD, schema.KEEP_POLICY)


def source_config(src: Location, overrides: list[str]) -> Config:
    """The source run's resolved config (its config.yaml) with `overrides` applied."""
    text = (src / "config.yaml").read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        return load_config(Path(handle.name), overrides)


def check_selectable(old: Config, new: Config) -> None:
    """ValueError naming the first setting that changed and cannot be applied without the models."""
    old_settings, new_settings = run_settings(old.run), run_settings(new.run)
    for key in SELECTABLE:
        section, name = key.split(".")
        old_settings[section].pop(name)
        new_settings[section].pop(name)
    for settings in (old_settings, new_settings):
        settings["scorers"] = [{k: v for k, v in s.items() if k != "threshold"} for s in settings["scorers"]]
    changed = differences(old_settings, new_settings, "run")
    if changed:
        raise ValueError(f"{changed[0]}: capfilt select changes only {', '.join('run.' + k for k in SELECTABLE)} "
                         "and run.scorers[i].threshold; run `capfilt run` for anything else")


def in_input_order(table: pa.Table, uri: str, key_column: str) -> pa.Table:
    """`table` (every row of one shard, in any order) in the order of the input shard's keys."""
    with location(uri).open_input_file() as handle:
        keys = pq.ParquetFile(handle).read(columns=[key_column])[key_column].to_pylist()
    where: dict = {}
    for position, key in enumerate(keys):
        where.setdefault(key, []).append(position)
    order = [where[key].pop(0) for key in table[key_column].to_pylist()]
    return table.take(pa.array(sorted(range(len(order)), key=order.__getitem__)))


def select_run(src: str, dest: str, overrides: list[str]) -> dict:
    """Re-filter `src`'s committed shards into `dest` with `overrides`; the stats of `dest`."""
    from capfilt.stages.policy import KeepPolicy

    load_config(None, overrides)  # an unknown key or a bad value fails first, naming the key
    source, out = location(src), location(dest)
    stored = Commits(source).stored_identity()
    if stored is None:
        raise FileNotFoundError(f"{src}: no {IDENTITY}; is it the --out of a capfilt run?")
    old = source_config(source, [])
    config = source_config(source, overrides)
    check_selectable(old, config)
    cfg = config.run
    policy = KeepPolicy(cfg)
    identity = {**stored, "settings": run_settings(cfg)}
    start = time.time()
    selected = skipped = 0
    with OutputLock(out, command="capfilt select", option="--to"):
        source_commits = Commits(source)
        ident_src = identity_key_of(stored)
        commits = Commits(out)
        commits.check_identity(identity)  # ConfigMismatch: DEST holds shards selected otherwise
        ident = commits.begin(identity)
        write_resolved(config, out)
        if (source / MODELS).is_file():  # the scores are the source run's models'
            (out / MODELS).write_bytes((source / MODELS).read_bytes())
        for name, entry in sorted(source_commits.entries.items()):
            if entry["identity"] != ident_src:
                continue  # a shard of another identity in the source (replaced by --force later)
            fingerprint = entry["input"]
            shard = Shard(name, entry["uri"], fingerprint["size"], fingerprint["mtime_ns"], fingerprint["rows"], None)
            if commits.is_committed(shard, ident):
                skipped += 1
                continue
            tables = [(source / dest_dir / f"{name}.parquet").read_table() for dest_dir in schema.OUTPUT_DIRS]
            table = pa.concat_tables(tables, promote_options="default")
            output_schema = tables[0].schema  # the run's: every file of a shard has it
            if shard.rows:
                table = in_input_order(table, shard.uri, cfg.columns.key)
            table = policy(table.drop_columns([c for c in DECIDED if c in table.column_names]))
            write_shard(out, shard, table, output_schema, ident)
            selected += 1
        last_run = {"shards_listed": len(source_commits.entries), "shards_skipped": skipped,
                    "shards_processed": selected, "shards_failed_whole": {}, "shards_unreadable": {},
                    "shards_uncommitted": {}, "pipeline_started": False, "rows_through_models": 0,
                    "seconds": round(time.time() - start, 3), "images_per_second": 0.0, "selected_from": src}
        stats = commits.stats(ident, last_run)
        commits.write_stats(stats)
    return stats
