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

Model folders are not here: models load from local folders (stage them on every node, see
docs/cluster.md).
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs

_GLOB_CHARS = "*?["
_RENAMING = ("local", "hdfs")  # filesystems whose rename is atomic: write a temporary file, then rename
_OBJECT_STORES = ("s3", "gcs")  # keys addressed as "bucket/key", no folders, no rename


@lru_cache(maxsize=64)
def _filesystem(scheme: str, authority: str) -> pafs.FileSystem:
    """One filesystem object per (scheme, bucket or host) and process: S3 clients are costly to build."""
    uri = f"{scheme}://{authority}/"
    try:
        return pafs.FileSystem.from_uri(uri)[0]
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

    # --- reading ----------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """A parquet file as a table (or the files of a folder as one)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def read_schema(self) -> pa.Schema:
        """A parquet file's schema, from its footer."""
        import pyarrow.parquet as pq

        return pq.read_schema(self.path, filesystem=self.fs)

    def open_input_file(self) -> pa.NativeFile:
        """A seekable file (parquet footers and row groups are read by range)."""
        return self.fs.open_input_file(self.path)

    def files(self, suffix: str = "") -> list[pafs.FileInfo]:
        """The files directly in this folder whose names end with `suffix`, sorted by path."""
        if not self.is_dir():
            return []
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((f for f in found if f.type == pafs.FileType.File and f.base_name.endswith(suffix)),
                      key=lambda f: f.path)

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
        with self.fs.open_output_stream(self.path) as sink:
            sink.write(data)
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
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)


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
    fs = _filesystem(scheme.lower(), authority)
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
    found = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
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
