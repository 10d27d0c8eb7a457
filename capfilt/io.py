"""Shards in, shards out: listing and checking input shards, per-shard atomic writers, manifest, stats.

Output layout (docs/data-format.md): `OUT/{data,rejected,failed}/<shard>.parquet`, one file per
input shard in each directory (empty files included, so every committed shard has all three),
`OUT/manifest.json` (committed shards with input fingerprints and counts, plus the identity of
the run: result-affecting settings and model fingerprints), `OUT/stats.json`, `OUT/config.yaml`.

A shard is committed in this order: its three files are written under `OUT/.tmp/`, renamed into
place (atomic on one filesystem), then its manifest entry is written (atomically, by rename).
A crash at any point leaves it uncommitted, and the next run redoes it and overwrites the files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import ColumnsConfig, RunConfig, to_dict

MANIFEST = "manifest.json"
STATS = "stats.json"
TMP = ".tmp"
MANIFEST_VERSION = 1
ROW_GROUP_ROWS = 2048  # rows buffered per output file before a row group is written
RESERVED = ("path",)  # Ray's include_paths column carries the source file through the pipeline

# Arrow types each mapped input column must have (any of).
_STRING = (pa.string(), pa.large_string())
_BINARY = (pa.binary(), pa.large_binary())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Input shards


@dataclass(frozen=True)
class Shard:
    name: str  # output base name (the input file's stem)
    path: str  # absolute input path
    size: int  # bytes, part of the fingerprint
    mtime_ns: int  # modification time, part of the fingerprint
    rows: int  # from the parquet footer; -1 when unreadable
    schema: pa.Schema | None  # input schema; None when unreadable
    problem: str | None = None  # why the whole shard fails ("schema: ..."), None when usable

    def fingerprint(self) -> dict:
        """What says the input is unchanged (not its path: a moved input directory stays committed)."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "rows": self.rows}


def list_shards(spec: str) -> list[Path]:
    """A directory (its `*.parquet`, sorted) or a glob pattern -> input shard paths."""
    if not spec:
        raise ValueError("no input given (--input DIR|GLOB)")
    path = Path(spec)
    found = sorted(path.glob("*.parquet")) if path.is_dir() else sorted(Path(p) for p in glob.glob(spec))
    found = [p for p in found if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no parquet shards match {spec!r}")
    stems: dict[str, Path] = {}
    for p in found:
        name = p.name[: -len(".parquet")] if p.name.endswith(".parquet") else p.name
        if name in stems:
            raise ValueError(f"two input shards would write the same output name {name!r}: {stems[name]} and {p}; "
                             "run them into separate --out directories")
        stems[name] = p
    return found


def schema_problem(input_schema: pa.Schema, columns: ColumnsConfig) -> str | None:
    """Why a shard with this schema cannot be processed (naming the column and config key), or None."""
    # A text column with no caption at all is typed null by some writers; it unifies with string.
    # Binary captions are decoded as UTF-8 row by row (stages/decode.py).
    required = {"key": (columns.key, _STRING), "image": (columns.image, _BINARY),
                "text": (columns.text, (*_STRING, *_BINARY, pa.null()))}
    for config_key, (column, types) in required.items():
        if column not in input_schema.names:
            return (f"schema: column {column!r} (run.columns.{config_key}) is missing; "
                    f"columns present: {input_schema.names}")
        if input_schema.field(column).type not in types:
            return (f"schema: column {column!r} (run.columns.{config_key}) has type "
                    f"{input_schema.field(column).type}, expected {' or '.join(map(str, types))}")
    if columns.status in input_schema.names and input_schema.field(columns.status).type not in _STRING:
        return f"schema: column {columns.status!r} (run.columns.status) must be a string"
    for column in (*RESERVED, *schema.TRANSIENT):
        if column in input_schema.names:
            return f"schema: input column {column!r} is reserved by capfilt; rename it"
    try:
        schema.output_schema(input_schema)
    except ValueError as err:
        return f"schema: {err}"
    return None


def inspect_shard(path: Path, columns: ColumnsConfig) -> Shard:
    """Fingerprint and schema-check one shard from its parquet footer (no data read)."""
    stat = path.stat()
    name = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name
    base = dict(name=name, path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    try:
        meta = pq.ParquetFile(path).metadata
        input_schema = meta.schema.to_arrow_schema()
    except Exception as err:  # noqa: BLE001 - an unreadable shard fails alone
        return Shard(**base, rows=-1, schema=None, problem=f"unreadable: {type(err).__name__}: {err}")
    return Shard(**base, rows=meta.num_rows, schema=input_schema, problem=schema_problem(input_schema, columns))


def unify(shards: list[Shard]) -> tuple[pa.Schema | None, list[Shard]]:
    """One read schema for all usable shards; a shard whose types conflict fails alone."""
    unified: pa.Schema | None = None
    out = []
    for shard in shards:
        if shard.problem is None:
            try:
                unified = shard.schema if unified is None else pa.unify_schemas(
                    [unified, shard.schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                shard = dataclasses.replace(shard, problem=f"schema: conflicts with the other shards ({err})")
        out.append(shard)
    return unified, out


def text_as_string(input_schema: pa.Schema, text: str) -> pa.Schema:
    """The schema rows are written with: a binary caption column becomes a string one.

    Captions are text whatever the input stored them as (stages/decode.py decodes them), and one
    binary shard must not turn every output's caption column into bytes.
    """
    if text not in input_schema.names:
        return input_schema
    index = input_schema.get_field_index(text)
    arrow_type = input_schema.field(text).type
    if pa.types.is_binary(arrow_type):
        return input_schema.set(index, input_schema.field(text).with_type(pa.string()))
    if pa.types.is_large_binary(arrow_type):
        return input_schema.set(index, input_schema.field(text).with_type(pa.large_string()))
    return input_schema


def iter_failed_shard(shard: Shard, cfg: RunConfig, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """The rows of a shard that fails as a whole, each marked failed with the shard's problem."""
    from capfilt.stages.decode import utf8_text
    from capfilt.stages.policy import KeepPolicy

    policy = KeepPolicy(cfg)
    text = cfg.columns.text
    for record_batch in pq.ParquetFile(shard.path).iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([record_batch])
        # Input columns that collide with capfilt's are dropped here (the problem says so).
        table = table.drop_columns([c for c in table.column_names
                                    if c in schema.ADDED_NAMES or c in schema.TRANSIENT])
        n = table.num_rows
        nulls = {
            schema.CAPTION_ITM: pa.float32(), schema.CAPTION_ITC: pa.float32(),
            schema.SYNTHETIC: pa.list_(pa.string()), schema.SYNTHETIC_ITM: pa.list_(pa.float32()),
            schema.SYNTHETIC_ITC: pa.list_(pa.float32()),
        }
        for name, arrow_type in nulls.items():
            table = table.append_column(name, pa.nulls(n, arrow_type))
        if text not in table.column_names:
            table = table.append_column(text, pa.nulls(n, pa.string()))
        elif table[text].type in (*_STRING, *_BINARY):  # decoded, invalid UTF-8 replaced: readable text
            table = table.set_column(table.schema.get_field_index(text), text, utf8_text(table[text])[0])
        table = table.append_column(schema.ERROR, pa.array([shard.problem] * n, pa.string()))
        table = policy(table)
        if text not in shard.schema.names:
            table = table.drop_columns([text])
        yield table


# ---------------------------------------------------------------------------------------------
# Per-shard counts


@dataclass
class ShardCounts:
    read: int = 0
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    failed_by_reason: Counter = dataclasses.field(default_factory=Counter)
    synthetic_generated: int = 0
    synthetic_kept: int = 0
    web_kept: int = 0
    texts: int = 0

    def add(self, dest: str, table: pa.Table) -> None:
        n = table.num_rows
        self.read += n
        if dest == schema.FAILED:
            self.failed += n
            for error in table[schema.ERROR].to_pylist():
                self.failed_by_reason[error.split(":", 1)[0].strip()] += 1
            return
        if dest == schema.DATA:
            self.kept += n
        else:
            self.rejected += n
        self.synthetic_generated += int(pc.sum(pc.list_value_length(table[schema.SYNTHETIC])).as_py() or 0)
        self.synthetic_kept += int(pc.sum(pc.cast(pc.list_flatten(table[schema.SYNTHETIC_KEEP]), pa.int64()))
                                   .as_py() or 0)
        self.web_kept += int(pc.sum(pc.cast(table[schema.CAPTION_KEEP], pa.int64())).as_py() or 0)
        self.texts += int(pc.sum(pc.list_value_length(table[schema.TEXTS])).as_py() or 0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["failed_by_reason"] = dict(sorted(self.failed_by_reason.items()))
        return out


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes one input shard's rows to its three output files and commits them atomically."""

    def __init__(self, out: Path, shard: Shard, output_schema: pa.Schema):
        self.out = Path(out)
        self.shard = shard
        self.schema = output_schema
        self.counts = ShardCounts()
        self._buffers: dict[str, list[pa.Table]] = {d: [] for d in schema.OUTPUT_DIRS}
        self._writers: dict[str, pq.ParquetWriter] = {}
        (self.out / TMP).mkdir(parents=True, exist_ok=True)

    def _tmp(self, dest: str) -> Path:
        return self.out / TMP / f"{self.shard.name}.{dest}.parquet"

    def write(self, dest: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self.counts.add(dest, table)
        self._buffers[dest].append(table)
        if sum(t.num_rows for t in self._buffers[dest]) >= ROW_GROUP_ROWS:
            self._flush(dest)

    def _flush(self, dest: str) -> None:
        if dest not in self._writers:
            self._writers[dest] = pq.ParquetWriter(self._tmp(dest), self.schema)
        if self._buffers[dest]:
            self._writers[dest].write_table(pa.concat_tables(self._buffers[dest]))
            self._buffers[dest] = []

    @property
    def complete(self) -> bool:
        return self.counts.read == self.shard.rows

    def commit(self) -> dict:
        """Close, rename into place; returns the manifest entry (the caller records it last)."""
        if not self.complete:
            raise RuntimeError(f"shard {self.shard.name}: {self.counts.read} of {self.shard.rows} rows written")
        for dest in schema.OUTPUT_DIRS:
            self._flush(dest)
            self._writers.pop(dest).close()
        for dest in schema.OUTPUT_DIRS:
            final = self.out / dest / f"{self.shard.name}.parquet"
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp(dest), final)
        return {"input": self.shard.fingerprint(), "path": self.shard.path, "counts": self.counts.to_dict(),
                "committed_at": time.time()}

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for dest in schema.OUTPUT_DIRS:
            self._tmp(dest).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Manifest, identity, stats


def model_fingerprint(model_id: str) -> dict:
    """What identifies a model folder's weights: config hash, safetensors sizes and mtimes."""
    path = Path(model_id)
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))}
    return {
        "id": str(path.resolve()),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights": weights,
    }


def run_identity(cfg: RunConfig) -> dict:
    """The settings that change the output; a resumed run must match them to add shards."""
    settings = to_dict(cfg)
    settings.pop("input")  # adding shards to a run is allowed
    resources = settings.pop("resources")
    settings["dtype"] = resources["dtype"]  # bf16 and fp32 give different scores
    for stage in ("caption", "filter"):  # captions are seeded per row, not per batch
        settings[stage].pop("batch_size")
        settings[stage].pop("gpu_batch_size")
    return {"settings": json.loads(json.dumps(settings)),
            "captioner": model_fingerprint(cfg.caption.model), "filter": model_fingerprint(cfg.filter.model)}


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: committed {old!r}, now {new!r}"]


class Manifest:
    """`OUT/manifest.json`: the run identity and the committed shards with their counts."""

    def __init__(self, out: Path):
        self.path = Path(out) / MANIFEST
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.identity: dict | None = data.get("identity")
        self.shards: dict[str, dict] = data.get("shards", {})

    def check_identity(self, identity: dict) -> None:
        """Refuse to add shards made with other settings or models to this output."""
        if self.identity is None or not self.shards:
            return
        diff = _differences({"run": self.identity["settings"], "captioner": self.identity["captioner"],
                             "filter": self.identity["filter"]},
                            {"run": identity["settings"], "captioner": identity["captioner"],
                             "filter": identity["filter"]}, "")
        if diff:
            raise ConfigMismatch(
                f"{self.path.parent} holds {len(self.shards)} shards made with other settings:\n  "
                + "\n  ".join(diff)
                + "\nUse a new --out directory, or --force to discard them and start over.")

    def is_committed(self, shard: Shard) -> bool:
        entry = self.shards.get(shard.name)
        return entry is not None and entry["input"] == shard.fingerprint()

    def record(self, name: str, entry: dict, identity: dict) -> None:
        self.identity = identity
        self.shards[name] = entry
        self.save()

    def forget(self, name: str) -> None:
        if self.shards.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": MANIFEST_VERSION, "identity": self.identity, "shards": self.shards})


class ConfigMismatch(RuntimeError):
    """The output directory holds shards made with different settings or models."""


def aggregate_stats(manifest: Manifest, last_run: dict) -> dict:
    """stats.json: totals over every committed shard (read = kept + rejected + failed), per shard too."""
    total = ShardCounts()
    per_shard = {}
    for name, entry in sorted(manifest.shards.items()):
        counts = entry["counts"]
        per_shard[name] = counts
        for field in ("read", "kept", "rejected", "failed", "synthetic_generated", "synthetic_kept",
                      "web_kept", "texts"):
            setattr(total, field, getattr(total, field) + counts[field])
        total.failed_by_reason.update(counts["failed_by_reason"])
    stats = total.to_dict()
    stats["shards"] = len(per_shard)
    stats["per_shard"] = per_shard
    stats["last_run"] = last_run
    return stats


def write_stats(out: Path, stats: dict) -> Path:
    path = Path(out) / STATS
    write_json_atomic(path, stats)
    return path


class OutputLock:
    """An exclusive lock on an output directory, released by the OS if the process dies."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / ".lock", "w")  # noqa: SIM115 - held for the run

    def __enter__(self) -> "OutputLock":
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(f"another capfilt run is writing to {self.out}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
