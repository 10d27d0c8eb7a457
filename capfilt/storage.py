"""Where data lives: local folders and object stores behind one `pyarrow.fs` interface.

Every input and output location of capfilt (`--input`, `--out`, `--data`, `--web`, ...) is a
`Location`, made from what the user typed:

| written as | filesystem | credentials and endpoint |
|---|---|---|
| `/data/web`, `data/web`, `file:///data/web` | local | - |
| `s3://bucket/prefix` | pyarrow's S3 | the AWS environment (below), instance roles |
| `gs://bucket/prefix` | pyarrow's GCS | the GCP defaults (`GOOGLE_APPLICATION_CREDENTIALS`, workload identity) |
| `hdfs://namenode:8020/path` | pyarrow's HDFS | libhdfs and `HADOOP_HOME`/`CLASSPATH` as pyarrow needs them |
| any other `scheme://` | fsspec's driver for it, if one is installed | that driver's |

The AWS environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` (MinIO, moto, R2, ...).

Writes are atomic for a reader: a file either is absent or is whole. Locally (and on HDFS) a file
is written under a temporary name in its folder and renamed into place. On object stores there
is no rename; the finished file is serialised in memory and uploaded in one request (large files
as one multipart upload), and an object is visible only once its upload has completed, so a writer
that dies leaves nothing behind, or an incomplete multipart upload that no reader lists.

Object stores fail in passing: throttling (`503 SlowDown`), other 5xx answers, dropped and
stalled connections. Each storage operation of a `Location` on an object store (a read, a
listing, a whole upload, a delete) is tried again after such a failure, with exponential backoff
and full jitter, up to `storage.attempts` tries and `storage.max_total_s` seconds (the `storage`
config section, `StorageConfig` below, embedded in capfilt/config.py); inside each try, pyarrow's AWS client retries
single HTTP requests too (`storage.request_attempts`), which also covers the range reads of an
open parquet file. A 4xx answer (wrong keys, no bucket, no permission, no object) is never
retried. What outlasts the retries is a `StorageUnavailable` (an OSError) naming the object, the
operation and the last error; Ray tasks retry OSErrors, and what still fails is reported per
shard or file, to be redone by a re-run. The settings of a process come from `configure` (every
command calls it with its config) and travel to Ray workers and child processes in the
environment (`CAPFILT_STORAGE`).

Model folders are not here: models load from local folders (stage them on every node, see
docs/cluster.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger("capfilt.storage")


@dataclass(frozen=True)
class StorageConfig:
    # Object-store calls (s3://, gs://, ...; capfilt/storage.py) that fail with throttling (503
    # SlowDown), a 5xx, a dropped or stalled connection are tried again after a backoff with full
    # jitter; 4xx answers (wrong keys, no bucket, no permission, no object) never are.
    attempts: int = 8  # tries of one storage operation (a read, a write, a listing) before its error stands
    backoff_s: float = 0.2  # the longest first wait; it doubles with each try (S3 clears SlowDown in seconds)
    max_backoff_s: float = 15.0  # the longest wait between two tries
    max_total_s: float = 180.0  # an operation stops being retried once it has taken this long
    # tries of each HTTP request inside one try, by pyarrow's AWS client (its standard retry mode,
    # a fast first line against single dropped requests); 1 leaves every retry to the keys above
    request_attempts: int = 3
    connect_timeout_s: float = 10.0  # a connection not established in this long fails (and is retried)
    request_timeout_s: float = 60.0  # a request that receives nothing for this long is a stall: dropped, retried


_GLOB_CHARS = "*?["
_RENAMING = ("local", "hdfs")  # filesystems whose rename is atomic: write a temporary file, then rename
_OBJECT_STORES = ("s3", "gcs")  # keys addressed as "bucket/key", no folders, no rename
SETTINGS_ENV = "CAPFILT_STORAGE"  # the storage settings of the driver, as JSON, for workers and child processes
# What a try can fail with and still succeed on the next: throttling, 5xx, dropped or stalled connections
# (pyarrow's AWS error names and curl's messages). Anything else, 4xx above all, is final; so is an
# INTERNAL_FAILURE without a message, which is pyarrow's AWS client finding no credentials, except
# on a GetObject, whose 500 answers come without one (a read is reached only after a listing).
_TRANSIENT = re.compile(r"SLOW_DOWN|SlowDown|THROTTL|Throttl|"
                        r"INTERNAL_FAILURE during (GetObject operation|\w+ operation: \S)|"
                        r"InternalError|"
                        r"SERVICE_UNAVAILABLE|NETWORK_CONNECTION|REQUEST_TIMEOUT|HTTP status 5\d\d|curlCode|"
                        r"Connection reset|Timeout was reached|Broken pipe")

T = TypeVar("T")


class StorageUnavailable(OSError):
    """A storage operation that kept failing with transient errors after every retry."""


UNAVAILABLE = r"failed \d+ times in [\d.]+ s, the last with: "  # in every StorageUnavailable's message


def _settings_from_env() -> StorageConfig:
    text = os.environ.get(SETTINGS_ENV)
    return StorageConfig(**json.loads(text)) if text else StorageConfig()


_settings = _settings_from_env()


def configure(settings: StorageConfig) -> None:
    """Use `settings` for every storage call of this process and of the workers and processes it starts."""
    global _settings
    _settings = settings
    _filesystem.cache_clear()  # clients are built with the settings' timeouts
    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings), sort_keys=True)


def settings() -> StorageConfig:
    return _settings


def forwarded_settings() -> dict[str, str]:
    """The environment that carries this process's settings to Ray workers; none for the defaults."""
    return {} if _settings == StorageConfig() else {SETTINGS_ENV: os.environ[SETTINGS_ENV]}


def transient(err: BaseException) -> bool:
    """Whether a failed storage call is worth another try (never a 4xx: keys, bucket, permission, key)."""
    return isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and bool(_TRANSIENT.search(str(err)))


def retried(what: str, call: Callable[[], T], cfg: StorageConfig | None = None) -> T:
    """`call()`, tried again after transient failures with full-jitter exponential backoff."""
    cfg = cfg or _settings
    start = time.monotonic()
    for attempt in range(1, cfg.attempts + 1):
        try:
            return call()
        except OSError as err:
            spent = time.monotonic() - start
            if not transient(err):
                raise
            wait = random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)))
            if attempt == cfg.attempts or spent + wait > cfg.max_total_s:
                raise StorageUnavailable(
                    f"{what} failed {attempt} times in {spent:.1f} s, the last with: {_one_line(err)} "
                    f"(storage.attempts={cfg.attempts}, storage.max_total_s={cfg.max_total_s:g})") from err
            log.warning("storage retry %d of %s in %.2f s: %s", attempt, what, wait, _one_line(err)[:300])
            time.sleep(wait)
    raise AssertionError("unreachable: storage.attempts is at least 1")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@lru_cache(maxsize=64)
def _filesystem(scheme: str, authority: str, cfg: StorageConfig) -> pafs.FileSystem:
    """One filesystem object per (scheme, bucket or host), settings and process: S3 clients are costly to build."""
    uri = f"{scheme}://{authority}/"
    try:
        fs = pafs.FileSystem.from_uri(uri)[0]
        if isinstance(fs, pafs.S3FileSystem):  # the options from_uri found (region, endpoint), with our timeouts
            options = fs.__reduce__()[1][0]
            # allow_delayed_open: an object under pyarrow's part size goes up in one PutObject, not a
            # three-request multipart upload (a third of the requests, each a chance to be throttled)
            options.update(connect_timeout=cfg.connect_timeout_s, request_timeout=cfg.request_timeout_s,
                           allow_delayed_open=True)
            fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(cfg.request_attempts))
        return fs
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        pyarrow_error = err
    try:  # schemes pyarrow has no driver for: fsspec's, when installed
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as err:
        raise ValueError(f"{uri}: no filesystem for this URI (pyarrow: {pyarrow_error}; fsspec: {err})") from None


@dataclass(frozen=True)
class Location:
    """A file or folder: a filesystem and a path in it (`/abs/dir` locally, `bucket/key` elsewhere)."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""  # "" for local paths
    authority: str = ""  # bucket or host:port of a URI

    def __str__(self) -> str:
        if self.local:
            return self.path
        rest = self.path[len(self.authority):].lstrip("/") if self.path.startswith(self.authority) else self.path
        return f"{self.scheme}://{self.authority}/{rest}" if rest else f"{self.scheme}://{self.authority}"

    def __reduce__(self) -> tuple:
        # Rebuilt from the URI where it is used, so a worker resolves credentials from its own
        # environment and nothing secret travels in a pickled filesystem.
        return location, (str(self),)

    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), self.scheme, self.authority)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), self.scheme, self.authority)

    def _retried(self, verb: str, call: Callable[[], T]) -> T:
        """`call()`, retried on transient errors of an object store (`retried`); locally as it is."""
        return call() if self.local else retried(f"{verb} {self}", call)

    # --- reading ----------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        return self._retried("HEAD", lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()

        return self._retried("GET", read)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """A parquet file as a table (or the files of a folder as one)."""
        import pyarrow.parquet as pq

        return self._retried("GET", lambda: pq.read_table(self.path, columns=columns, filesystem=self.fs))

    def read_schema(self) -> pa.Schema:
        """A parquet file's schema, from its footer."""
        import pyarrow.parquet as pq

        return self._retried("GET", lambda: pq.read_schema(self.path, filesystem=self.fs))

    def open_input_file(self) -> pa.NativeFile:
        """A seekable file (parquet footers and row groups are read by range, each read retried)."""
        handle = self._retried("HEAD", lambda: self.fs.open_input_file(self.path))
        return handle if self.local else pa.PythonFile(_RetriedReads(handle, self), mode="r")

    def files(self, suffix: str = "") -> list[pafs.FileInfo]:
        """The files directly in this folder whose names end with `suffix`, sorted by path."""
        if not self.is_dir():
            return []
        found = self._retried("LIST", lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))
        return sorted((f for f in found if f.type == pafs.FileType.File and f.base_name.endswith(suffix)),
                      key=lambda f: f.path)

    def listing(self) -> list[pafs.FileInfo]:
        """What is directly under this folder or prefix (files and folders, unsorted); [] when nothing is."""
        return self._retried("LIST", lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))

    def at(self, info: pafs.FileInfo) -> Location:
        """The location of a `FileInfo` listed from this filesystem."""
        return Location(self.fs, info.path, self.scheme, self.authority)

    # --- writing ----------------------------------------------------------------------------

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        elif self.fs.type_name not in _OBJECT_STORES:  # object stores have no folders (an empty marker object is noise)
            self.fs.create_dir(self.path, recursive=True)

    def write_with(self, write: Callable[[Any], None]) -> int:
        """Atomically write this file with `write(sink)`, a writable pyarrow stream; returns its size."""
        self.parent.makedirs()
        if self.fs.type_name in _RENAMING:
            tmp = posixpath.join(posixpath.dirname(self.path), f".{self.name}.tmp-{uuid.uuid4().hex}")
            try:
                with self.fs.open_output_stream(tmp) as sink:
                    write(sink)
                    size = sink.tell()
                self.fs.move(tmp, self.path)
            except BaseException:
                if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    self.fs.delete_file(tmp)
                raise
            return size
        buffer = pa.BufferOutputStream()
        write(buffer)  # a failure here uploads nothing
        data = buffer.getvalue()

        def upload() -> None:  # whole or not at all; a retry after a lost answer uploads the same bytes again
            with self.fs.open_output_stream(self.path) as sink:
                sink.write(data)

        self._retried("PUT", upload)
        return data.size

    def write_bytes(self, data: bytes) -> int:
        return self.write_with(lambda sink: sink.write(data))

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any) -> int:
        return self.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")

    def write_table(self, table: pa.Table, **options: Any) -> None:
        """`table` as one parquet file; `options` go to pyarrow's write_table (row_group_size, ...)."""
        import pyarrow.parquet as pq

        self.write_with(lambda sink: pq.write_table(table, sink, **options))

    def delete(self) -> None:
        """Remove this file or folder (and what is in it); nothing if it is not there."""
        kind = self.info().type
        if kind == pafs.FileType.NotFound:
            return
        delete = self.fs.delete_dir if kind == pafs.FileType.Directory else self.fs.delete_file

        def gone() -> None:
            try:
                delete(self.path)
            except FileNotFoundError:  # a try whose answer was lost deleted it already
                pass

        self._retried("DELETE", gone)


class _RetriedReads:
    """A file object over an object-store input file whose every read is retried (`retried`)."""

    def __init__(self, handle: pa.NativeFile, where: Location):
        self.handle, self.where, self.position, self.closed = handle, where, 0, False

    def size(self) -> int:
        return self.handle.size()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.handle.size()}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, nbytes: int = -1) -> bytes:
        if nbytes is None or nbytes < 0:
            nbytes = self.handle.size() - self.position
        data = retried(f"GET {self.where} (bytes {self.position}-{self.position + nbytes})",
                       lambda: self.handle.read_at(nbytes, self.position))
        self.position += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.handle.close()


def location(spec: str | Path | Location) -> Location:
    """A Location from a path or URI (see the module docstring for the schemes)."""
    if isinstance(spec, Location):
        return spec
    text = str(spec)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" not in text:
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
    scheme, rest = text.split("://", 1)
    authority, _, key = rest.partition("/")
    if not authority:
        raise ValueError(f"{spec}: a URI needs a bucket or host after {scheme}://")
    fs = _filesystem(scheme.lower(), authority, _settings)
    # Object stores address keys as "bucket/key"; HDFS and fsspec drivers take the path alone.
    path = posixpath.join(authority, key) if fs.type_name in _OBJECT_STORES else "/" + key
    return Location(fs, path.rstrip("/") or path, scheme.lower(), authority)


def is_glob(spec: str | Path) -> bool:
    return any(c in str(spec) for c in _GLOB_CHARS)


def glob_files(spec: str | Path) -> list[Location]:
    """Files matching a glob pattern (`*`, `?`, `[...]` within one path segment), sorted by path.

    Works the same locally and on object stores: the folder before the first pattern segment is
    listed recursively and each segment is matched on its own, so `*` never crosses a `/`.
    """
    text = str(spec)
    parts = text.split("/")
    static = next(i for i, part in enumerate(parts) if is_glob(part))
    root = location("/".join(parts[:static]) or ("/" if text.startswith("/") else "."))
    pattern = [p for p in root.path.split("/") if p] + parts[static:]
    found = root._retried("LIST", lambda: root.fs.get_file_info(
        pafs.FileSelector(root.path, recursive=True, allow_not_found=True)))
    matches = []
    for info in found:
        segments = [p for p in info.path.split("/") if p]
        if info.type == pafs.FileType.File and len(segments) == len(pattern) and all(
                fnmatch.fnmatchcase(s, p) for s, p in zip(segments, pattern)):
            matches.append(root.at(info))
    return sorted(matches, key=lambda loc: loc.path)


def parquet_files(spec: str | Path | Location) -> list[Location]:
    """The parquet files of a folder (sorted), of a glob, or of a CapFilt output root's `data/` part."""
    text = str(spec)
    if is_glob(text):
        found = [loc for loc in glob_files(text) if loc.name.endswith(".parquet")]
        if not found:
            raise FileNotFoundError(f"no parquet files match {text!r}")
        return found
    folder = location(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    found = [folder.at(info) for info in folder.files(".parquet")]
    if not found and (folder / "data").is_dir():
        found = [folder.at(info) for info in (folder / "data").files(".parquet")]
    if not found:
        raise FileNotFoundError(f"{folder}: no .parquet files (nor in {folder / 'data'})")
    return found
