"""Output folders: staged parts, per-shard commits with one marker each, the run identity, stats.

Layout of `OUT` (a local folder or an object-store prefix; docs/data-format.md):

    OUT/data/<shard>.parquet       one file per input shard in each of the three folders,
    OUT/rejected/<shard>.parquet   empty files included, rows in input order
    OUT/failed/<shard>.parquet
    OUT/_commits/<shard>.json      the commit marker of a shard: input fingerprint, counts, identity key
    OUT/_identity.json             the settings and model fingerprints the shards were made with
    OUT/stats.json                 totals aggregated from the markers
    OUT/stats_shards.parquet       the same per shard, one row each (and what the next run need not re-read)
    OUT/config.yaml                the resolved configuration of the last run
    OUT/.staging/<run>/<shard>/    parts of shards in flight (removed as each shard commits)

Who writes what: Ray workers write everything with rows in it. Each block leaving the keep
policy is split by shard and written by the worker as a part file under `.staging/<run>/<shard>/`
(`stage_parts`): the row positions, the caption and CapFilt's columns only, as the pipeline
carries no other input column. The driver receives only the parts' names and row ranges. When the
parts of a shard cover all of its rows (the count is in its footer), a commit task on a worker
reads them, orders the rows by their position in the input, joins the other input columns (the
image bytes among them) from the input shard (`join_input`), writes the three output files, and
last writes the shard's marker (`commit_shard`). Every file is written atomically (capfilt/storage.py),
so a reader sees a shard's file whole or not at all, and a shard is committed exactly when its
marker exists: a crash before that leaves it to be redone, and redoing it writes the same bytes.

The markers are capfilt/markers.py's; `marker_location` and `read_markers` serve `capfilt export`
too (capfilt/export_pairs.py: one marker per exported file).

Cost per shard is O(1) whatever the output holds: one marker is written, none is rewritten.
Stats are aggregated from a listing of `_commits/` (one request per thousand markers on an object
store); markers already in the previous `stats_shards.parquet` (same name, size and time) are not
read again, so a re-run over a large output reads only the markers that are new. Each run stages
under its own `<run>` folder, so commit tasks of a killed run that finish late never touch the
parts of the run that redoes its shards.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import RunConfig, to_dict
from capfilt.markers import done_record, mark_done
from capfilt.shards import Shard, read_columns
from capfilt.stats import COUNT_FIELDS, ShardCounts, totals
from capfilt.storage import Location, location

COMMITS = "_commits"
IDENTITY = "_identity.json"
MODELS = "models.json"  # provenance: each model's id, folder and SHA-256 of its config and weights
STATS = "stats.json"
SHARD_STATS = "stats_shards.parquet"
STAGING = ".staging"
MARKER_READ_THREADS = 32  # markers read at once when they are not in the previous stats (object-store latency)
MARKER_VERSION = 1
ROW_GROUP_ROWS = 2048  # rows per row group of an output file (fixed, so a redone shard writes the same bytes)


class ConfigMismatch(RuntimeError):
    """The output folder holds shards made with different settings or models."""


class OutputBusy(RuntimeError):
    """Another capfilt run holds the output folder."""


class CommitError(RuntimeError):
    """A shard's parts do not add up to its rows; it stays uncommitted."""


# ---------------------------------------------------------------------------------------------
# Routing and writing


def route(batch: pa.Table) -> dict[str, pa.Table]:
    """Split a policy-stage batch into its `data`, `rejected` and `failed` rows."""
    failed = batch[schema.ERROR].is_valid()
    kept = pc.fill_null(pc.greater(pc.list_value_length(batch[schema.TEXTS]), 0), False)
    ok = pc.invert(failed)
    return {
        schema.DATA: batch.filter(pc.and_(ok, kept)),
        schema.REJECTED: batch.filter(pc.and_(ok, pc.invert(kept))),
        schema.FAILED: batch.filter(failed),
    }


def write_parquet(table: pa.Table, loc: Location) -> int:
    """Write `table` as one parquet file, atomically; returns its size in bytes."""
    return loc.write_with(lambda sink: pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS))


def _ranges(rows: np.ndarray) -> list[int]:
    """Sorted distinct row positions as flat [start, end) pairs: [0, 4, 9, 12] is rows 0-3 and 9-11."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[rows[0]], rows[breaks]])
    ends = np.concatenate([rows[breaks - 1] + 1, [rows[-1] + 1]])
    return np.column_stack([starts, ends]).ravel().tolist()


def stage_parts(batch: pa.Table, staging: Location) -> list[dict]:
    """Write each shard's rows of a policy-stage batch as a part file; returns what the driver needs.

    A part's name is a function of the rows in it, so a block that Ray retries rewrites the same
    part instead of adding a second copy of its rows.
    """
    staged = []
    names = batch[schema.SHARD]
    for shard in pc.unique(names).to_pylist():
        part = batch.filter(pc.equal(names, shard)).drop_columns([schema.SHARD])
        part = part.take(pc.sort_indices(part[schema.ROW]))
        rows = part[schema.ROW].to_numpy()
        digest = hashlib.blake2b(rows.tobytes(), digest_size=6).hexdigest()
        loc = staging / shard / f"{int(rows[0]):010d}-{int(rows[-1]):010d}-{digest}.parquet"
        write_parquet(part, loc)
        routed = {dest: t.num_rows for dest, t in route(part).items()}
        staged.append({"shard": shard, "part": loc.name, "ranges": _ranges(rows), "rows": part.num_rows,
                       "kept": routed[schema.DATA], "rejected": routed[schema.REJECTED],
                       "failed": routed[schema.FAILED]})
    return staged


class Coverage:
    """Which rows of one shard its staged parts hold (merged [start, end) intervals)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.parts: dict[str, list[int]] = {}
        self._intervals: list[tuple[int, int]] = []

    def add(self, part: str, ranges: list[int]) -> None:
        if part in self.parts:  # a retried block rewrote a part already counted
            return
        self.parts[part] = ranges
        merged = []
        for start, end in sorted(self._intervals + list(zip(ranges[::2], ranges[1::2]))):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self._intervals = merged

    @property
    def covered(self) -> int:
        return sum(end - start for start, end in self._intervals)

    @property
    def complete(self) -> bool:
        return self.covered == self.rows


def commit_shard(out: Location, staging: Location, shard: Shard, parts: list[str], output_schema: pa.Schema,
                 identity_key: str) -> dict:
    """Assemble a shard from its parts under `staging`, write its three files, then its marker.

    Idempotent: a retry of a commit that already finished (its node died before it could report)
    finds the marker and returns it, though the parts are gone.
    """
    marker = done_record(marker_location(out, shard.name))
    if marker is not None and marker["input"] == shard.fingerprint() and marker["identity"] == identity_key:
        return marker
    staging = staging / shard.name
    tables = [(staging / part).read_table() for part in sorted(parts)]
    table = pa.concat_tables(tables) if tables else output_schema.empty_table()
    if schema.ROW in table.column_names:
        table = table.take(pc.sort_indices(table[schema.ROW]))
        rows = table[schema.ROW].to_numpy()
        first = np.concatenate([[True], np.diff(rows) != 0]) if rows.size else np.zeros(0, bool)
        table = table.filter(pa.array(first))  # a row staged twice (overlapping retries) counts once
        if not np.array_equal(rows[first], np.arange(shard.rows)):
            raise CommitError(f"shard {shard.name}: its parts hold {int(first.sum())} distinct rows, "
                              f"its footer says {shard.rows}")
        table = join_input(shard, table, output_schema)
    marker = write_shard(out, shard, table, output_schema, identity_key)
    staging.delete()
    return marker


def join_input(shard: Shard, staged: pa.Table, output_schema: pa.Schema) -> pa.Table:
    """The staged rows (every row of the shard, in order) with the input columns they lack, read
    from the input shard: the image bytes and the columns CapFilt does not read never went
    through the pipeline."""
    missing = pa.schema([f for f in output_schema if f.name not in staged.column_names])
    if not len(missing):
        return staged
    joined = read_columns(shard, missing)
    for column in staged.column_names:
        joined = joined.append_column(staged.schema.field(column), staged[column])
    return joined


def write_shard(out: Location, shard: Shard, table: pa.Table, output_schema: pa.Schema,
                identity_key: str) -> dict:
    """Write a shard's rows (input order, all of them) to its three files, then its marker."""
    counts = ShardCounts()
    files = {}
    table = table.select(output_schema.names).cast(output_schema)
    for dest, part in route(table).items():
        counts.add(dest, part)
        files[dest] = write_parquet(part, out / dest / f"{shard.name}.parquet")
    if counts.read != shard.rows:
        raise CommitError(f"shard {shard.name}: {counts.read} of {shard.rows} rows written")
    marker = {"version": MARKER_VERSION, "shard": shard.name, "uri": shard.uri, "input": shard.fingerprint(),
              "identity": identity_key, "counts": counts.to_dict(), "bytes": files, "committed_at": time.time()}
    mark_done(marker_location(out, shard.name), marker)
    return marker


# ---------------------------------------------------------------------------------------------
# Markers: one small JSON object per committed unit (a shard here, an exported file in capfilt/export_pairs.py)


def marker_location(out: Location, name: str) -> Location:
    return out / COMMITS / f"{name}.json"


def read_markers(out: Location, cached: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every marker under `out/_commits/`, by name, each with `"marker": [size, mtime_ns]` added.

    A marker whose name, size and time match an entry of `cached` is taken from it instead of
    being read again; the others are read by a pool of threads (object-store latency).
    """
    cached = cached or {}
    entries, unread = {}, []
    for info in (out / COMMITS).files(".json"):
        name = info.base_name[: -len(".json")]
        stamp = [info.size, info.mtime_ns]
        if name in cached and cached[name]["marker"] == stamp:
            entries[name] = cached[name]
        else:
            unread.append((name, info, stamp))
    with ThreadPoolExecutor(max_workers=min(MARKER_READ_THREADS, max(1, len(unread)))) as pool:
        read = pool.map(lambda item: out.at(item[1]).read_json(), unread)
        for (name, _, stamp), marker in zip(unread, read):
            entries[name] = {**marker, "marker": stamp}
    return entries


# ---------------------------------------------------------------------------------------------
# Identity


def model_fingerprint(model_id: str) -> dict:
    """What identifies a model folder's weights (a hub id's cached snapshot's): config hash,
    safetensors sizes and mtimes."""
    from capfilt.model.hub import resolve_model

    path = resolve_model(model_id)
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))}
    return {
        "id": str(path.resolve()),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights": weights,
    }


def model_provenance(cfg: RunConfig, identity: dict) -> dict:
    """Each model of the run as given (folder or hub id), the folder its `identity` fingerprint
    resolved it to, the SHA-256 of its config.json (the fingerprint's) and of each *.safetensors
    file: what a reader needs to know which weights scored the rows. Weights are hashed once per
    file version (`capfilt.digests`)."""
    from capfilt.digests import file_sha256

    def described(model_id: str, fingerprint: dict) -> dict:
        folder = Path(fingerprint["id"])
        return {"model": model_id, "folder": fingerprint["id"], "config_sha256": fingerprint["config_sha256"],
                "weights_sha256": {name: file_sha256(folder / name) for name in fingerprint["weights"]}}

    return {"captioner": described(cfg.caption.model, identity["captioner"]),
            "filter": described(cfg.filter.model, identity["filter"]) if cfg.filter.model else None,
            "scorers": {s.name: described(s.model, identity["scorers"][s.name]) for s in cfg.scorers}}


def run_identity(cfg: RunConfig) -> dict:
    """The settings that change the output and the models; a resumed run must match them to add shards."""
    return {"settings": run_settings(cfg),
            "captioner": model_fingerprint(cfg.caption.model),
            "filter": model_fingerprint(cfg.filter.model) if cfg.filter.model else None,  # none: run.scorers decide
            **({"scorers": {s.name: model_fingerprint(s.model) for s in cfg.scorers}} if cfg.scorers else {})}


def run_settings(cfg: RunConfig) -> dict:
    """The `run` settings that change the output (not the input location, batch sizes, resources)."""
    settings = to_dict(cfg)
    settings.pop("input")  # adding shards to a run is allowed
    resources = settings.pop("resources")
    settings["dtype"] = resources["dtype"]  # bf16 and fp32 give different scores
    settings["decode_on_device"] = resources["decode_on_device"]  # nvJPEG + torch's resize: other pixels
    for stage in ("caption", "filter"):  # captions are seeded per row, not per batch
        settings[stage].pop("batch_size")
    settings["filter"].pop("bucket_tokens")  # how texts are grouped for the model, as batch_size
    for scorer in settings["scorers"]:  # the bootstrap's calibration of the threshold, which is stored
        scorer.pop("threshold_quantile")
    for how in ("eos_check_every", "cuda_graphs"):  # how often the loop looks, not what it samples
        settings["caption"].pop(how)
    return json.loads(json.dumps(settings))


def identity_key_of(identity: dict) -> str:
    """The identity's key: 16 hex digits of its hash, stamped on every marker made under it."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: was OLD, now NEW` for each dotted key whose value differs between two trees (configs, identities)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: was {old!r}, now {new!r}"]


# ---------------------------------------------------------------------------------------------
# The committed state of an output folder


_SHARD_STATS_SCHEMA = pa.schema(
    [("shard", pa.string()), ("marker_size", pa.int64()), ("marker_mtime_ns", pa.int64()), ("identity", pa.string()),
     ("uri", pa.string()), ("input_size", pa.int64()), ("input_mtime_ns", pa.int64()), ("input_rows", pa.int64())]
    + [(name, pa.int64()) for name in COUNT_FIELDS]
    + [("failed_by_reason", pa.string()), ("committed_at", pa.float64())])


def _entry_row(name: str, entry: dict) -> dict:
    counts = entry["counts"]
    return {"shard": name, "marker_size": entry["marker"][0], "marker_mtime_ns": entry["marker"][1],
            "identity": entry["identity"], "uri": entry["uri"], "input_size": entry["input"]["size"],
            "input_mtime_ns": entry["input"]["mtime_ns"], "input_rows": entry["input"]["rows"],
            **{k: counts[k] for k in COUNT_FIELDS}, "failed_by_reason": json.dumps(counts["failed_by_reason"]),
            "committed_at": entry.get("committed_at")}


def _row_entry(row: dict) -> dict:
    counts = {k: row[k] for k in COUNT_FIELDS} | {"failed_by_reason": json.loads(row["failed_by_reason"])}
    return {"shard": row["shard"], "uri": row["uri"], "identity": row["identity"], "counts": counts,
            "input": {"size": row["input_size"], "mtime_ns": row["input_mtime_ns"], "rows": row["input_rows"]},
            "committed_at": row["committed_at"], "marker": [row["marker_size"], row["marker_mtime_ns"]]}


class Commits:
    """The committed shards of `OUT`, read from its markers (through the previous stats_shards.parquet)."""

    def __init__(self, out: Location | str):
        self.out = location(out)
        self.entries: dict[str, dict] = {}
        self.entries = self._read()

    def _cached(self) -> dict[str, dict]:
        loc = self.out / SHARD_STATS
        if not loc.is_file():
            return {}
        try:
            return {row["shard"]: _row_entry(row) for row in loc.read_table().to_pylist()}
        except (pa.ArrowException, OSError, KeyError, ValueError):  # damaged: the markers are read instead
            return {}

    def _read(self) -> dict[str, dict]:
        return read_markers(self.out, self.entries or self._cached())

    def stored_identity(self) -> dict | None:
        loc = self.out / IDENTITY
        return loc.read_json() if loc.is_file() else None

    def check_identity(self, identity: dict) -> None:
        """Refuse to add shards made with other settings or models to this output."""
        stored = self.stored_identity()
        if stored is None or identity_key_of(stored) == identity_key_of(identity):
            return
        if not any(e["identity"] == identity_key_of(stored) for e in self.entries.values()):
            return  # nothing committed under the stored identity: nothing to protect
        def named(ident: dict) -> dict:
            return {"run" if part == "settings" else part: value for part, value in ident.items()}

        diff = differences(named(stored), named(identity), "")
        raise ConfigMismatch(
            f"{self.out} holds {len(self.entries)} shards made with other settings:\n  " + "\n  ".join(diff)
            + "\nUse a new --out directory, or --force to discard them and start over.")

    def begin(self, identity: dict) -> str:
        """Record the identity new commits are made with; returns its key (stamped on every marker)."""
        (self.out / IDENTITY).write_json(identity)
        return identity_key_of(identity)

    def is_committed(self, shard: Shard, identity_key: str) -> bool:
        entry = self.entries.get(shard.name)
        return entry is not None and entry["input"] == shard.fingerprint() and entry["identity"] == identity_key

    def forget(self, name: str) -> None:
        """Drop a marker whose input changed (its shard is redone)."""
        if self.entries.pop(name, None) is not None:
            marker_location(self.out, name).delete()

    def stats(self, identity_key: str, last_run: dict) -> dict:
        """The totals over the committed shards of this identity (re-listed: commit tasks added markers)."""
        self.entries = self._read()
        committed = {name: e for name, e in self.entries.items() if e["identity"] == identity_key}
        return totals(committed, last_run)

    def write_stats(self, stats: dict) -> None:
        """stats.json (totals) and stats_shards.parquet (every marker, one row each)."""
        rows = [_entry_row(name, self.entries[name]) for name in sorted(self.entries)]
        write_parquet(pa.Table.from_pylist(rows, schema=_SHARD_STATS_SCHEMA), self.out / SHARD_STATS)
        (self.out / STATS).write_json(stats)

    def discard(self) -> None:
        """--force: remove what earlier runs wrote (only capfilt's files and folders)."""
        for name in (*schema.OUTPUT_DIRS, COMMITS, STAGING, IDENTITY, STATS, SHARD_STATS):
            (self.out / name).delete()
        self.entries = {}


class OutputLock:
    """An exclusive lock on a local output folder, released by the OS if the process dies.

    Object stores have no lock: two runs into one prefix are the user's to avoid (docs/cluster.md).
    `command` and `option` name the writer and its output flag in the refusal.
    """

    def __init__(self, out: Location, command: str = "capfilt run", option: str = "--out"):
        self.out, self.command, self.option = out, command, option
        self._file = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        if not self.out.local:
            return self
        self.out.makedirs()
        self._file = open(Path(self.out.path) / ".lock", "w")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OutputBusy(f"another {self.command} is writing to {self.out}; wait for it or choose another "
                             f"{self.option}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def new_staging(out: Location) -> Location:
    """A fresh staging folder for this run; parts left by runs that died are removed first."""
    (out / STAGING).delete()
    return out / STAGING / uuid.uuid4().hex[:12]


def end_staging(staging: Location) -> None:
    """Remove this run's staging folder (and `.staging` itself when nothing else is in it)."""
    staging.delete()
    parent = staging.parent
    if parent.is_dir() and not parent.listing():
        parent.delete()
