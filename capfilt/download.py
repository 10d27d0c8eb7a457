"""Web ingestion: a URL list in, img2dataset parquet shards out, every URL accounted for.

img2dataset does the downloading, resizing and shard writing. Around it this module:
- reads .txt/.csv/.tsv/.parquet URL lists itself and hands img2dataset one normalised parquet
  file, so a URL with a comma in a .txt list is a URL, not a CSV parse error;
- refuses URL schemes outside `download.schemes` before anything is fetched (urllib would read
  file:// paths from this machine);
- keeps the run offline apart from the URLs (no wandb, no albumentations update check) and bounds
  decoding with OpenCV's pixel limit;
- reconciles every output shard against its input rows afterwards: a row img2dataset did not
  write (a sample or whole shard that crashed) is added back as failed with a reason, so
  success + failed = URLs read, and each shard is rewritten sorted by key.

Output: `OUT/00000.parquet, ...` in the input-shard format (`key`, `url`, `caption`, `jpg`,
`status`, `error_message`, sizes, `sha256`, extra input columns), img2dataset's
`OUT/00000_stats.json` per shard (it resumes from them when the same command is run again).
`OUT` may be an object-store URI (`s3://bucket/web`): img2dataset then downloads into a local
staging folder (`download.staging`, or a temporary one) and each shard is uploaded whole, parquet
first and its stats file last, once it is reconciled; a re-run skips the shards already uploaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from capfilt import preflight, schema
from capfilt.config import ConfigError, DownloadConfig, check
from capfilt.storage import Location, location

URL, CAPTION, KEY, IMAGE = "url", "caption", "key", "jpg"
STATUS, ERROR_MESSAGE = "status", "error_message"
FAILED_TO_DOWNLOAD = "failed_to_download"  # img2dataset's status for a URL that was not fetched
OOM_SHARD_COUNT = 5  # digits of the shard number in file names and keys (img2dataset's default)

# Columns img2dataset writes itself; an input column with one of these names would collide.
IMG2DATASET_COLUMNS = (
    KEY, STATUS, ERROR_MESSAGE, "width", "height", "original_width", "original_height", "exif",
    "md5", "sha256", "sha512", IMAGE, "txt",
)

# Set while img2dataset runs; its spawned workers inherit them.
_OFFLINE_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version on import
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
}


class DownloadError(ValueError):
    """A URL list or output folder that cannot be used; the message says which and why."""


@dataclass
class DownloadSummary:
    """What a download produced, counted from the shards on disk after reconciliation."""

    read: int  # rows in the URL list
    success: int
    failed: int
    shards: list[Location] = field(default_factory=list)
    by_status: dict[str, int] = field(default_factory=dict)  # status -> rows
    by_reason: list[tuple[str, str, int]] = field(default_factory=list)  # (status, reason, rows)

    def lines(self, top: int = 10) -> list[str]:
        """Human-readable counts: totals, then the most frequent failure reasons."""
        out = [f"read {self.read} URLs: {self.success} success, {self.failed} failed "
               f"in {len(self.shards)} shard(s)"]
        for status, count in sorted(self.by_status.items(), key=lambda kv: -kv[1]):
            out.append(f"  {status}: {count}")
        if self.by_reason:
            out.append("failure reasons:")
        for status, reason, count in self.by_reason[:top]:
            out.append(f"  {count:>8}  {status}  {reason}")
        if len(self.by_reason) > top:
            rest = sum(c for _, _, c in self.by_reason[top:])
            out.append(f"  {rest:>8}  ... {len(self.by_reason) - top} other reasons")
        return out


# ---------------------------------------------------------------------------------------------
# Reading the URL list


def _input_format(path: Path, cfg: DownloadConfig) -> str:
    if cfg.input_format != "auto":
        return cfg.input_format
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("txt", "csv", "tsv", "parquet"):
        raise DownloadError(
            f"{path}: cannot tell the URL list format from the suffix {path.suffix!r}; use .txt, "
            ".csv, .tsv or .parquet, or set download.input_format"
        )
    return suffix


def _read_table(path: Path, fmt: str, cfg: DownloadConfig) -> pa.Table:
    if fmt == "txt":
        urls = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        urls = [u for u in urls if u]
        return pa.table({URL: pa.array(urls, pa.string()),
                         CAPTION: pa.nulls(len(urls), pa.string())})
    if fmt == "parquet":
        table = pq.read_table(path)
    else:
        table = pacsv.read_csv(
            path,
            # TSV captions are free text: a stray quote must not swallow the following rows.
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False) if fmt == "tsv"
            else pacsv.ParseOptions(delimiter=","),
            # URLs and captions stay text even when a column happens to look numeric.
            convert_options=pacsv.ConvertOptions(
                column_types={cfg.url_col: pa.string(), cfg.caption_col: pa.string()}),
        )
    for key, column in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
        if column not in table.column_names:
            raise DownloadError(
                f"{path}: column {column!r} (download.{key}) is missing; "
                f"columns present: {table.column_names}"
            )
    extras = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col)]
    url = pc.utf8_trim_whitespace(table[cfg.url_col].cast(pa.string()))
    return pa.table([url, table[cfg.caption_col].cast(pa.string())] + [table[c] for c in extras],
                    names=[URL, CAPTION] + extras)


def read_url_list(path: str | Path, cfg: DownloadConfig) -> pa.Table:
    """The URL list as a table with string `url` and `caption` columns, then any extra columns.

    A .txt list has one URL per line (blank lines skipped) and no captions (null). A .csv/.tsv
    list has a header row. Other formats need `download.url_col` and `download.caption_col`;
    every other column is passed through.
    """
    path = Path(path)
    if not path.is_file():
        raise DownloadError(f"URL list {path} does not exist or is not a file")
    fmt = _input_format(path, cfg)
    try:
        table = _read_table(path, fmt, cfg)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise DownloadError(f"URL list {path} cannot be read as {fmt}: {err}") from err
    if table.num_rows == 0:
        raise DownloadError(f"URL list {path} holds no URLs")
    clash = sorted(set(table.column_names[2:]) & (set(IMG2DATASET_COLUMNS) | {URL, CAPTION}
                                                  | set(schema.ADDED_NAMES)))
    if clash:
        raise DownloadError(
            f"{path}: extra column(s) {clash} collide with columns the download or CapFilt "
            "writes; rename them in the URL list"
        )
    return table


def refusal_reason(url: str | None, schemes: tuple[str, ...]) -> str | None:
    """Why a URL is not fetched at all, or None when it may be fetched."""
    if not url:
        return "refused: empty URL"
    scheme = urlsplit(url).scheme.lower()
    if scheme not in schemes:
        return f"refused: URL scheme {scheme!r} is not in download.schemes {list(schemes)}"
    return None


def check_config(cfg: DownloadConfig) -> None:
    """Refuse values img2dataset would crash on mid-run, naming the key: their ranges
    (capfilt.config.RANGES), and the URL schemes."""
    check(cfg, "download")
    if not cfg.schemes or any(s != s.lower() or not s for s in cfg.schemes):
        raise ConfigError(f"download.schemes must be non-empty lower-case schemes, got {list(cfg.schemes)}")


# ---------------------------------------------------------------------------------------------
# Running img2dataset


@contextlib.contextmanager
def _img2dataset_env(cfg: DownloadConfig) -> Iterator[None]:
    """Offline switches and OpenCV's decode limit for this process and the workers it spawns."""
    # OpenCV checks the header's width*height against this before allocating the image.
    env = {**_OFFLINE_ENV, "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_pixels)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # img2dataset installs a SIGINT handler that exits the process; give the caller theirs back.
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if main_thread:
            signal.signal(signal.SIGINT, sigint)


def _run_img2dataset(url_file: Path, out: Path, extras: list[str], cfg: DownloadConfig) -> None:
    from img2dataset import download as img2dataset_download  # slow: albumentations, cv2, wandb

    args = dict(
        url_list=str(url_file),
        output_folder=str(out),
        input_format="parquet",
        url_col=URL,
        caption_col=CAPTION,
        save_additional_columns=extras or None,
        output_format="parquet",
        encode_format=IMAGE,
        encode_quality=cfg.encode_quality,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        min_image_size=cfg.min_side,
        max_image_area=cfg.max_pixels,  # backstop to OPENCV_IO_MAX_IMAGE_PIXELS, which acts first
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        timeout=cfg.timeout,
        retries=cfg.retries,
        number_sample_per_shard=cfg.rows_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        extract_exif=cfg.extract_exif,
        compute_hash="sha256" if cfg.compute_hash else None,
        distributor="multiprocessing",
        enable_wandb=False,
        incremental_mode="incremental",  # re-running the same command resumes finished shards
        max_shard_retry=1,
    )
    try:
        img2dataset_download(**args)
    except SystemExit as stop:  # its Ctrl-C handler exits with status 0, as if all went well
        raise DownloadError(f"download into {out} interrupted; run the same command again to "
                            "resume the unfinished shards") from stop


# ---------------------------------------------------------------------------------------------
# Reconciling the shards with the URL list


def shard_schema(input_schema: pa.Schema, cfg: DownloadConfig) -> pa.Schema:
    """The columns img2dataset writes for this input, in its order."""
    extras = [f for f in input_schema if f.name not in (URL, CAPTION)]
    fields = extras + [
        pa.field(CAPTION, pa.string()), pa.field(URL, pa.string()),
        pa.field(KEY, pa.string()), pa.field(STATUS, pa.string()),
        pa.field(ERROR_MESSAGE, pa.string()),
        pa.field("width", pa.int32()), pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()), pa.field("original_height", pa.int32()),
    ]
    if cfg.extract_exif:
        fields.append(pa.field("exif", pa.string()))
    if cfg.compute_hash:
        fields.append(pa.field("sha256", pa.string()))
    return pa.schema(fields + [pa.field(IMAGE, pa.binary())])


def _shard_keys(shard_id: int, rows: int, cfg: DownloadConfig) -> list[str]:
    from img2dataset.downloader import compute_key  # the exact key format img2dataset writes

    oom_sample = math.ceil(math.log10(cfg.rows_per_shard))
    return [compute_key(i, shard_id, oom_sample, OOM_SHARD_COUNT) for i in range(rows)]


def _read_shard(path: Path, target: pa.Schema) -> tuple[pa.Table | None, str]:
    """The shard img2dataset wrote, or None and why there is none (missing, unreadable)."""
    if not path.exists():
        return None, "img2dataset wrote no shard (see its log)"
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        return None, f"img2dataset shard unreadable: {err}"
    unexpected = sorted(set(table.column_names) - set(target.names))
    if unexpected:
        raise DownloadError(f"{path}: unexpected column(s) {unexpected} (expected {target.names})")
    return table.select(target.names).cast(target), ""


def _set(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def _reconcile_shard(shard_id: int, inputs: pa.Table, refused: dict[int, str], out: Path,
                     cfg: DownloadConfig) -> Path:
    """Rewrite one shard so it holds exactly one row per input row, sorted by key.

    `inputs` are this shard's input rows (original URLs), `refused` maps a row's index within
    the shard to why it was never fetched.
    """
    target = shard_schema(inputs.schema, cfg)
    path = out / f"{_shard_name(shard_id)}.parquet"
    keys = _shard_keys(shard_id, inputs.num_rows, cfg)
    row_of = {k: i for i, k in enumerate(keys)}
    urls = inputs[URL].to_pylist()
    written, missing_reason = _read_shard(path, target)

    parts: list[pa.Table] = []
    present: set[int] = set()
    if written is not None:
        rows = [row_of.get(k) for k in written[KEY].to_pylist()]
        for key, i, url in zip(written[KEY].to_pylist(), rows, written[URL].to_pylist()):
            if i is None or i in present:
                raise DownloadError(f"{path}: key {key!r} is not one of this shard's rows or "
                                    "appears twice; write the download to a new folder")
            # A refused row went to img2dataset with an empty URL.
            if url != urls[i] and not (i in refused and url == ""):
                raise DownloadError(
                    f"{path}: row {key} has URL {url!r} but the URL list has {urls[i]!r}: the "
                    "folder holds a download of another URL list; use a new folder")
            present.add(i)
        if any(i in refused for i in rows):  # put the original URL and the reason back
            written = _set(written, URL, [urls[i] for i in rows])
            written = _set(written, STATUS, [FAILED_TO_DOWNLOAD if i in refused else s
                                             for i, s in zip(rows, written[STATUS].to_pylist())])
            written = _set(written, ERROR_MESSAGE, [
                refused[i] if i in refused else e
                for i, e in zip(rows, written[ERROR_MESSAGE].to_pylist())])
        parts.append(written)

    missing = [i for i in range(inputs.num_rows) if i not in present]
    if missing:
        rows_missing = inputs.take(missing).to_pylist()
        for i, row in zip(missing, rows_missing):
            reason = refused.get(i) or (
                f"not downloaded: {missing_reason or 'img2dataset wrote no row'}")
            row.update({KEY: keys[i], STATUS: FAILED_TO_DOWNLOAD, ERROR_MESSAGE: reason})
        parts.append(pa.Table.from_pylist(rows_missing, schema=target))

    table = pa.concat_tables(parts).sort_by(KEY)
    location(path).write_table(table)
    return path


def summarize(read: int, shards: list[Location]) -> DownloadSummary:
    by_status: Counter[str] = Counter()
    by_reason: Counter[tuple[str, str]] = Counter()
    for shard in shards:
        cols = shard.read_table(columns=[STATUS, ERROR_MESSAGE]).to_pydict()
        for status, reason in zip(cols[STATUS], cols[ERROR_MESSAGE]):
            by_status[status] += 1
            if status != schema.STATUS_SUCCESS:
                by_reason[(status, reason or "")] += 1
    success = by_status.get(schema.STATUS_SUCCESS, 0)
    total = sum(by_status.values())
    if total != read:  # reconciliation makes this impossible; a bug if it ever fires
        raise DownloadError(f"shards hold {total} rows but the URL list has {read}")
    return DownloadSummary(
        read=read, success=success, failed=total - success, shards=shards,
        by_status=dict(by_status),
        by_reason=[(s, r, c) for (s, r), c in by_reason.most_common()],
    )


# ---------------------------------------------------------------------------------------------


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def _check_output(dest: Location) -> None:
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"output {dest} exists and is not a folder")
    # img2dataset takes every *.json in its output folder for a finished shard's stats file.
    foreign = sorted(f.base_name for f in dest.files(".json") if not re.fullmatch(r"\d+_stats\.json", f.base_name))
    if foreign:
        raise DownloadError(f"output {dest} holds {foreign}, which img2dataset would misread as "
                            "shard stats; use a new folder for the download")


@contextlib.contextmanager
def _staging(dest: Location, cfg: DownloadConfig) -> Iterator[tuple[Path, set[str]]]:
    """(local folder img2dataset writes to, names of the shards already complete at `dest`).

    A local output is its own staging folder. For an object-store output, the stats files of the
    shards already uploaded are copied into the staging folder, so img2dataset skips them.
    """
    if dest.local:
        yield Path(dest.path), set()
        return
    uploaded = {f.base_name[: -len("_stats.json")] for f in dest.files("_stats.json")}
    with contextlib.ExitStack() as stack:
        folder = Path(cfg.staging) if cfg.staging else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="capfilt-download-staging-")))
        folder.mkdir(parents=True, exist_ok=True)
        for name in uploaded:
            (folder / f"{name}_stats.json").write_bytes((dest / f"{name}_stats.json").read_bytes())
        yield folder, uploaded


def download(url_list: str | Path, out: str | Path, cfg: DownloadConfig) -> DownloadSummary:
    """Download every URL of `url_list` into parquet shards in `out` (a folder or URI); return the counts."""
    dest = location(out)
    check_config(cfg)
    inputs = read_url_list(url_list, cfg)
    preflight.check(outputs={"OUT": str(out)})  # before img2dataset fetches a URL
    _check_output(dest)
    dest.makedirs()

    urls = inputs[URL].to_pylist()
    refused = {i: r for i, u in enumerate(urls) if (r := refusal_reason(u, cfg.schemes))}
    # Refused rows go to img2dataset with an empty URL, which urllib fails without any I/O, so
    # row positions (and thus keys) stay those of the URL list.
    sent = inputs.set_column(0, URL, pa.array(
        ["" if i in refused else u for i, u in enumerate(urls)], pa.string()))

    # The normalised list lives outside `out`, where no shard reader will pick it up.
    with tempfile.TemporaryDirectory(prefix="capfilt-download-") as tmp, _staging(dest, cfg) as (local, uploaded):
        url_file = Path(tmp) / "urls.parquet"
        pq.write_table(sent, url_file)
        with _img2dataset_env(cfg):
            _run_img2dataset(url_file, local, inputs.column_names[2:], cfg)
            n = cfg.rows_per_shard
            shards = []
            for s in range(math.ceil(inputs.num_rows / n)):
                shard = dest / f"{_shard_name(s)}.parquet"
                if _shard_name(s) not in uploaded:
                    path = _reconcile_shard(
                        s, inputs.slice(s * n, n),
                        {i - s * n: r for i, r in refused.items() if s * n <= i < (s + 1) * n}, local, cfg)
                    if not dest.local:  # the shard first, its stats (what marks it done) last
                        shard.write_bytes(path.read_bytes())
                        stats = local / f"{_shard_name(s)}_stats.json"
                        if stats.is_file():
                            (dest / stats.name).write_bytes(stats.read_bytes())
                shards.append(shard)
    return summarize(inputs.num_rows, shards)
