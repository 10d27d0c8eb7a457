"""`capfilt export`: the kept rows of a CapFilt output folder as files trainers read directly.

    OUT/data/<shard>.parquet (committed shards, by name) -> samples -> DEST/<00000..N> files

| export.format | files in DEST | read by |
|---|---|---|
| webdataset | `00000.tar` ... (`{key}.jpg`/`.txt`/`.json`), `00000_stats.json` ... | open_clip, webdataset loaders |
| hf | `data-00000-of-0000N.arrow` ..., `state.json`, `dataset_info.json` | `datasets.load_from_disk(DEST)` |
| parquet | `00000.parquet` ... | pandas, pyarrow, DuckDB, HF `load_dataset("parquet")`, LAVIS-style (`--explode`) |

A sample is a data/ row (one image, all its kept texts) or, with `export.explode`, one kept text
of a row (the row repeated, with `text` and `text_index` added). Samples are numbered in one
sequence: shards by name, rows in file order, texts in `texts` order; output file j holds samples
[j*S, (j+1)*S) of it (S = `export.samples_per_shard`; 0 keeps one file per data/ shard). Files
are therefore even in size whatever each shard's keep rate, and named 00000..N without gaps, as
img2dataset names its shards and open_clip's brace pattern expects. The plan comes from the
source's commit markers alone (kept rows and texts per shard): the driver reads no rows.

Exactly once: each output file is written by one task (atomically, capfilt/storage.py), its
side files next, and last its marker `DEST/_commits/<file>.json` (capfilt/commit.py's markers).
`DEST/_identity.json` records the export settings and the source shards the plan was made from.
A re-run with the same identity skips files whose marker exists and writes the others (a killed
export resumes); a redone file is the same bytes, since the plan and each file's contents are
functions of the identity. A destination holding an export of another identity is refused, or
emptied first with `--force`. This module plans and writes; the Ray wiring is
capfilt/pipelines/export_pairs.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.commit import (COMMITS, IDENTITY, STAGING, Commits, ConfigMismatch, differences, identity_key_of,
                            marker_location, read_markers, write_parquet)
from capfilt.config import ColumnsConfig, ExportConfig
from capfilt.markers import mark_done
from capfilt.storage import Location, location

SUMMARY = "_export.json"  # totals over the files, written at the end of every export run
RESOLVED_CONFIG = "_config.yaml"  # `_`-prefixed, so folder readers (pyarrow, pandas) skip it
MARKER_VERSION = 1
NAME_DIGITS = 5  # img2dataset's oom_shard_count (00000.tar); names widen only past 100,000 files
TAR_MTIME = 0  # fixed member times and owners, so a redone tar is the same bytes
HF_EXTRA = "pip install 'capfilt[hf]'"

# Leading bytes of the image formats capfilt decodes -> the extension webdataset decoders key on.
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


class ExportError(ValueError):
    """A source, destination or row that cannot be exported; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The plan: which samples go into which file


@dataclass(frozen=True)
class Piece:
    shard: str  # data/<shard>.parquet
    start: int  # first sample of the shard in this piece
    stop: int  # one past its last


@dataclass(frozen=True)
class Chunk:
    name: str  # output file stem, also its marker's name
    pieces: tuple[Piece, ...]

    @property
    def samples(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


def cut(counts: list[tuple[str, int]], per_file: int) -> list[tuple[Piece, ...]]:
    """Samples of the shards, in order, cut into files of `per_file` (the last holds the rest);
    0: one file per shard that has samples."""
    if per_file == 0:
        return [(Piece(shard, 0, n),) for shard, n in counts if n]
    files, current, room = [], [], per_file
    for shard, n in counts:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Piece(shard, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                files.append(tuple(current))
                current, room = [], per_file
    if current:
        files.append(tuple(current))
    return files


def name_width(files: int) -> int:
    return max(NAME_DIGITS, len(str(max(files - 1, 0))))


@dataclass(frozen=True)
class Target:
    """What every export task needs: the same for all files of one export."""

    source: Location
    dest: Location
    format: str  # a key of FORMATS
    explode: bool
    columns: ColumnsConfig  # the source run's key/image/text columns
    sample_schema: pa.Schema  # data/ columns (+ text, text_index when exploded), the same in every file
    identity_key: str  # key of the export identity (commit.identity_key_of), stamped on every marker


@dataclass(frozen=True)
class Plan:
    target: Target
    chunks: tuple[Chunk, ...]
    identity: dict  # what `_identity.json` holds
    source: dict  # the source's totals over the planned shards: shards, kept, texts, samples

    @property
    def format(self) -> "FormatWriter":
        return FORMATS[self.target.format]


def _committed_shards(source: Location) -> tuple[dict, list[tuple[str, dict]]]:
    """The source run's identity and its committed shards of that identity, by name."""
    if not (source / IDENTITY).is_file():
        raise ExportError(f"{source} is not a capfilt run output (no {IDENTITY}); give the --out folder of "
                          "`capfilt run`")
    commits = Commits(source)
    stored = commits.stored_identity()
    if "settings" not in stored:
        raise ExportError(f"{source} is not a capfilt run output (its {IDENTITY} is not a run's; an export?)")
    run_key = identity_key_of(stored)
    shards = sorted((name, e) for name, e in commits.entries.items() if e["identity"] == run_key)
    if not shards:
        raise ExportError(f"{source} has no committed shards: run `capfilt run` into it first")
    return stored, shards


def _sample_schema(source: Location, shards: list[tuple[str, dict]], cfg: ExportConfig,
                   columns: ColumnsConfig) -> pa.Schema:
    """The data/ schema (from one footer) with the columns the export adds; refuses clashing names."""
    first = next(name for name, entry in shards if entry["counts"]["kept"])
    with (source / schema.DATA / f"{first}.parquet").open_input_file() as handle:
        data = pq.ParquetFile(handle).schema_arrow.remove_metadata()
    added = [pa.field(schema.TEXT, pa.string()), pa.field(schema.TEXT_INDEX, pa.int32())] if cfg.explode else []
    taken = [f.name for f in added if f.name in data.names]
    if cfg.format == "hf" and columns.image != schema.HF_IMAGE and schema.HF_IMAGE in data.names:
        taken.append(schema.HF_IMAGE)
    if taken:
        raise ExportError(f"the source has column(s) {taken}, which this export writes; rename them in the input")
    return pa.schema(list(data) + added)


def _under(loc: Location, folder: Location) -> bool:
    """`loc` is `folder` or a path inside it."""
    here, there = str(loc).rstrip("/"), str(folder).rstrip("/")
    return here == there or here.startswith(there + "/")


def plan_export(source: str | Location, dest: str | Location, cfg: ExportConfig) -> Plan:
    """The files of exporting `source` (a `capfilt run` output) to `dest`, from its markers only."""
    source, dest = location(source), location(dest)
    if cfg.format not in FORMATS:
        raise ExportError(f"export.format: {cfg.format!r} is not one of {sorted(FORMATS)}")
    if cfg.samples_per_shard < 0:
        raise ExportError(f"export.samples_per_shard must be 0 (one file per data/ shard) or more, got "
                          f"{cfg.samples_per_shard}")
    if str(dest) == str(source) or any(_under(dest, source / name) for name in (*schema.OUTPUT_DIRS, COMMITS, STAGING)):
        raise ExportError(f"--to {dest} is the source folder or inside its data; export to a folder of its own "
                          f"(e.g. {source / 'webdataset'})")
    stored, shards = _committed_shards(source)
    columns = ColumnsConfig(**stored["settings"]["columns"])
    unit = "texts" if cfg.explode else "kept"
    counts = [(name, entry["counts"][unit]) for name, entry in shards]
    totals = {"shards": len(shards), "kept": sum(e["counts"]["kept"] for _, e in shards),
              "texts": sum(e["counts"]["texts"] for _, e in shards)}
    totals["samples"] = totals[unit]
    if not totals["samples"]:
        raise ExportError(f"{source} has no kept rows to export ({len(shards)} committed shards, all rows "
                          "rejected or failed)")
    sample_schema = _sample_schema(source, shards, cfg, columns)
    pieces = cut(counts, cfg.samples_per_shard)
    fmt = FORMATS[cfg.format]
    width = name_width(len(pieces))
    chunks = tuple(Chunk(fmt.stem(i, len(pieces), width), p) for i, p in enumerate(pieces))
    listing = json.dumps([[name, e["committed_at"], e["counts"]["kept"], e["counts"]["texts"]] for name, e in shards])
    identity = {
        "export": {"format": cfg.format, "explode": cfg.explode, "samples_per_shard": cfg.samples_per_shard},
        "source": {"run_identity": identity_key_of(stored), "shards": len(shards), "kept": totals["kept"],
                   "texts": totals["texts"], "shards_sha256": hashlib.sha256(listing.encode()).hexdigest()},
        "sample_schema": str(sample_schema),
    }
    target = Target(source, dest, cfg.format, cfg.explode, columns, sample_schema, identity_key_of(identity))
    return Plan(target, chunks, identity, totals)


# ---------------------------------------------------------------------------------------------
# The destination: identity, committed files, discarding


def prepare_destination(plan: Plan, force: bool) -> dict[str, dict]:
    """Check (or with `force` discard) what `dest` holds, record this identity; returns the files
    already committed under it, by name."""
    dest, fmt = plan.target.dest, plan.format
    stored = (dest / IDENTITY).read_json() if (dest / IDENTITY).is_file() else None
    if stored is not None and "export" not in stored:
        raise ExportError(f"--to {dest} holds a capfilt run output, not an export; choose another destination")
    foreign = stored is None and any(fmt.owns(info.base_name) for info in dest.files())
    if not force and foreign:
        raise ExportError(f"--to {dest} already holds {fmt.name} files that no capfilt export made; choose an "
                          "empty destination, or --force to replace them")
    markers = read_markers(dest)
    if not force and stored is not None and identity_key_of(stored) != plan.target.identity_key and any(
            m.get("identity") == identity_key_of(stored) for m in markers.values()):
        diff = differences(stored, plan.identity)
        raise ConfigMismatch(
            f"--to {dest} holds an export made with other settings or from another state of the source:\n  "
            + "\n  ".join(diff) + "\nUse a new --to destination, or --force to replace that export.")
    if force:
        discard(dest)
        markers = {}
    (dest / IDENTITY).write_json(plan.identity)
    names = {chunk.name for chunk in plan.chunks}
    return {name: m for name, m in markers.items() if name in names and m.get("identity") == plan.target.identity_key}


def discard(dest: Location) -> None:
    """--force: remove what exports wrote in `dest` (only files named as an export names them)."""
    for info in dest.files():
        if any(fmt.owns(info.base_name) for fmt in FORMATS.values()) or info.base_name in (
                IDENTITY, SUMMARY, RESOLVED_CONFIG):
            dest.at(info).delete()
    (dest / COMMITS).delete()


def summarise(plan: Plan, committed: dict[str, dict], last_run: dict) -> dict:
    """`_export.json`: totals over the committed files, reconciled with the source; the format's
    own metadata once every file is in (HF's state.json)."""
    markers = [committed[c.name] for c in plan.chunks if c.name in committed]
    summary = {
        "format": plan.target.format, "explode": plan.target.explode, "source": str(plan.target.source),
        "files": len(plan.chunks), "files_committed": len(markers),
        "samples": sum(m["samples"] for m in markers), "images": sum(m["images"] for m in markers),
        "texts": sum(m["texts"] for m in markers), "bytes": sum(sum(m["files"].values()) for m in markers),
        "source_totals": plan.source, "complete": len(markers) == len(plan.chunks),
        "last_run": last_run,
    }
    summary.update(plan.format.summary(plan))
    if summary["complete"]:
        if (summary["images"], summary["texts"]) != (plan.source["kept"], plan.source["texts"]):
            raise ExportError(f"the exported files hold {summary['images']} images and {summary['texts']} texts, "
                              f"the source's markers {plan.source['kept']} and {plan.source['texts']}")
        plan.format.finish(plan)
    (plan.target.dest / SUMMARY).write_json(summary)
    return summary


# ---------------------------------------------------------------------------------------------
# One file (a task on a worker)


def _read_rows(pf: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    groups, first, offset = [], 0, 0
    for i in range(pf.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            first = first if groups else offset
            groups.append(i)
        offset += n
    return pf.read_row_groups(groups).slice(start - first, stop - start)


def explode(table: pa.Table) -> pa.Table:
    """One row per kept text: each row repeated for each of its `texts`, with `text` and `text_index`."""
    texts = table[schema.TEXTS]
    lengths = pc.fill_null(pc.list_value_length(texts), 0).to_numpy()
    starts = np.cumsum(lengths) - lengths
    rows = table.take(pa.array(np.repeat(np.arange(table.num_rows), lengths)))
    index = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    return rows.append_column(schema.TEXT, pc.list_flatten(texts)).append_column(
        schema.TEXT_INDEX, pa.array(index, pa.int32()))


def read_piece(source: Location, piece: Piece, exploded: bool) -> pa.Table:
    """The samples [start, stop) of one data/ shard."""
    loc = source / schema.DATA / f"{piece.shard}.parquet"
    with loc.open_input_file() as handle:
        pf = pq.ParquetFile(handle)
        if not exploded:
            table = _read_rows(pf, piece.start, piece.stop)
        else:
            lengths = pc.fill_null(pc.list_value_length(pf.read(columns=[schema.TEXTS])[schema.TEXTS]), 0).to_numpy()
            ends = np.cumsum(lengths)
            first = int(np.searchsorted(ends, piece.start, side="right"))  # the row holding sample `start`
            last = int(np.searchsorted(ends, piece.stop - 1, side="right")) + 1
            skip = piece.start - int(ends[first] - lengths[first])
            table = explode(_read_rows(pf, first, last)).slice(skip, piece.stop - piece.start)
    if table.num_rows != piece.stop - piece.start:
        raise ExportError(f"{loc} holds fewer samples than its commit marker counts ({table.num_rows} of "
                          f"[{piece.start}, {piece.stop})); was it changed after `capfilt run`? Re-run it")
    return table


def chunk_table(target: Target, chunk: Chunk) -> pa.Table:
    """The samples of one output file, in order, in the export's one schema."""
    tables = []
    for piece in chunk.pieces:
        table = read_piece(target.source, piece, target.explode)
        try:
            tables.append(table.select(target.sample_schema.names).cast(target.sample_schema))
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ExportError(f"data/{piece.shard}.parquet does not fit the columns of the other shards ({err}); "
                              "export the shards of one run") from None
    return pa.concat_tables(tables)


def export_chunk(target: Target, chunk: Chunk) -> dict:
    """Write one output file and its side files from its samples, then its marker; returns the marker."""
    started = time.time()
    table = chunk_table(target, chunk)
    fmt = FORMATS[target.format]
    if target.explode:
        images = int(pc.sum(pc.equal(table[schema.TEXT_INDEX], 0)).as_py() or 0)  # counted where the first text is
        texts = table.num_rows
    else:
        images, texts = table.num_rows, int(pc.sum(pc.list_value_length(table[schema.TEXTS])).as_py() or 0)
    counts = {"samples": table.num_rows, "images": images, "texts": texts}
    files = fmt.write(table, target, chunk)
    files.update(fmt.write_side_files(counts, target, chunk, started))
    marker = {"version": MARKER_VERSION, "name": chunk.name, "identity": target.identity_key, **counts, "files": files,
              "pieces": [[p.shard, p.start, p.stop] for p in chunk.pieces], "seconds": round(time.time() - started, 3),
              "committed_at": time.time()}
    mark_done(marker_location(target.dest, chunk.name), marker)
    return marker


# ---------------------------------------------------------------------------------------------
# Formats


class FormatWriter:
    """An export format's writer: how it names, writes and finishes its files (`FORMATS`, by `export.format`)."""

    name = ""
    pattern = re.compile("")  # the names of the files this format writes

    def stem(self, index: int, files: int, width: int) -> str:
        return f"{index:0{width}d}"

    def owns(self, file_name: str) -> bool:
        return bool(self.pattern.fullmatch(file_name))

    def check(self) -> None:
        """Fail before any work if the format cannot be written here."""

    def write(self, table: pa.Table, target: Target, chunk: Chunk) -> dict[str, int]:
        """Write the chunk's file; returns {file name: bytes}."""
        raise NotImplementedError

    def write_side_files(self, counts: dict, target: Target, chunk: Chunk, started: float) -> dict[str, int]:
        """Files beside the chunk's file, written after it (before the marker); returns {file name: bytes}."""
        return {}

    def summary(self, plan: Plan) -> dict:
        return {}

    def finish(self, plan: Plan) -> None:
        """Metadata written once every file is committed."""


def image_extension(data: bytes) -> str:
    """The extension of encoded image bytes, from their leading bytes (webdataset decodes by extension)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    from PIL import Image  # a format beyond the usual ones (run.image.formats): PIL reads the header only

    with Image.open(io.BytesIO(data)) as img:
        return (img.format or "img").lower()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


class WebDataset(FormatWriter):
    """img2dataset's webdataset layout: `{key}.jpg` (or .png, ...), `{key}.txt`, `{key}.json` per sample."""

    name = "webdataset"
    pattern = re.compile(r"\d{5,}(\.tar|_stats\.json)")

    def write(self, table: pa.Table, target: Target, chunk: Chunk) -> dict[str, int]:
        cols = target.columns
        meta_columns = [f.name for f in table.schema if f.name != cols.image
                        and not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]

        def write(sink: Any) -> None:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for batch in table.to_batches(max_chunksize=256):
                    images, metas = batch.column(cols.image).to_pylist(), batch.select(meta_columns).to_pylist()
                    for image, meta in zip(images, metas):
                        key = str(meta[cols.key])
                        if "." in key:
                            raise ExportError(f"key {key!r} contains '.', which webdataset reads as the start of the "
                                              f"file extension; use keys without dots (run.columns.key={cols.key!r})")
                        if target.explode:
                            key, text = f"{key}_{meta[schema.TEXT_INDEX]}", meta[schema.TEXT]
                        else:
                            text = meta[schema.TEXTS][0]
                        _tar_member(tar, f"{key}.{image_extension(image)}", image)
                        _tar_member(tar, f"{key}.txt", text.encode("utf-8"))
                        _tar_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, default=str).encode())

        name = f"{chunk.name}.tar"
        return {name: (target.dest / name).write_with(write)}

    def write_side_files(self, counts: dict, target: Target, chunk: Chunk, started: float) -> dict[str, int]:
        """`{file}_stats.json` with img2dataset's keys (so its tooling sums them), and the export's counts."""
        ended = time.time()
        n = counts["samples"]
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": ended - started, "start_time": started, "end_time": ended,
                 "status_dict": {"success": n}, "images": counts["images"], "texts": counts["texts"],
                 "pieces": [[p.shard, p.start, p.stop] for p in chunk.pieces]}
        name = f"{chunk.name}_stats.json"
        return {name: (target.dest / name).write_json(stats)}

    def summary(self, plan: Plan) -> dict:
        last = plan.chunks[-1].name
        return {"train_data": str(plan.target.dest / f"{{{plan.chunks[0].name}..{last}}}.tar")}


class Parquet(FormatWriter):
    """data/ rows (or exploded ones) re-cut into even files; the image stays encoded bytes."""

    name = "parquet"
    pattern = re.compile(r"\d{5,}\.parquet")

    def write(self, table: pa.Table, target: Target, chunk: Chunk) -> dict[str, int]:
        name = f"{chunk.name}.parquet"
        return {name: write_parquet(table, target.dest / name)}


def require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"--format hf needs the `datasets` package: {HF_EXTRA}") from None
    return datasets


class HFArrow(FormatWriter):
    """The folder `Dataset.save_to_disk` writes: arrow stream files with the features in their
    schema, `state.json` listing them and `dataset_info.json` (`datasets.load_from_disk` reads it)."""

    name = "hf"
    pattern = re.compile(r"data-\d{5,}-of-\d{5,}\.arrow|state\.json|dataset_info\.json")
    STATE, INFO = "state.json", "dataset_info.json"

    def stem(self, index: int, files: int, width: int) -> str:
        return f"data-{index:0{width}d}-of-{files:0{width}d}"

    def check(self) -> None:
        require_datasets()

    def features(self, target: Target) -> Any:
        """The sample columns as datasets features, the image as `Image()` named `image`."""
        datasets = require_datasets()
        fields = [pa.field(schema.HF_IMAGE, pa.binary()) if f.name == target.columns.image else f
                  for f in target.sample_schema]
        features = datasets.Features.from_arrow_schema(pa.schema(fields))
        features[schema.HF_IMAGE] = datasets.Image()
        return features

    def write(self, table: pa.Table, target: Target, chunk: Chunk) -> dict[str, int]:
        require_datasets()
        from datasets.arrow_writer import ArrowWriter

        features = self.features(target)
        images = pc.cast(table[target.columns.image], pa.binary())
        image = pa.chunked_array(
            [pa.StructArray.from_arrays([c, pa.nulls(len(c), pa.string())], names=["bytes", "path"])
             for c in images.chunks], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = table.set_column(table.schema.get_field_index(target.columns.image), schema.HF_IMAGE, image)

        def write(sink: Any) -> None:
            writer = ArrowWriter(features=features, stream=sink)
            writer.write_table(table)
            writer.finalize(close_stream=False)

        name = f"{chunk.name}.arrow"
        return {name: (target.dest / name).write_with(write)}

    def finish(self, plan: Plan) -> None:
        """state.json and dataset_info.json as `save_to_disk` writes them, last: the folder loads only once
        every file is in."""
        datasets = require_datasets()
        from datasets.utils.py_utils import asdict

        info = asdict(datasets.DatasetInfo(features=self.features(plan.target)))
        state = {"_data_files": [{"filename": f"{c.name}.arrow"} for c in plan.chunks],
                 "_fingerprint": plan.target.identity_key, "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        dest = plan.target.dest
        (dest / self.INFO).write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))
        (dest / self.STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


FORMATS: dict[str, FormatWriter] = {fmt.name: fmt for fmt in (WebDataset(), HFArrow(), Parquet())}
