"""SHA-256 of model weight files, for provenance: computed once per file version, then remembered.

Hashing a 15 GB VLM's weights takes ~30 s at the ~550 MB/s this machine hashes, so a digest is
kept in a small JSON cache (`CAPFILT_CACHE`, else `~/.cache/capfilt`) under the file's real path,
size, modification time and inode: a file written again (new mtime or inode) is hashed again. A
file in the Hugging Face hub cache is a blob named by its own SHA-256 (git LFS), so its name is
its digest and nothing is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

CACHE_ENV = "CAPFILT_CACHE"
CHUNK = 8 << 20  # bytes read at a time
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_file() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "capfilt") / "sha256.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or torn by a crash: hashing again is always correct
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(cache, tmp)
        os.replace(tmp.name, path)  # whole or not at all; concurrent writers each leave a valid file
    except OSError:
        pass  # a read-only home costs a hash per run, nothing else


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (of the file a symlink points to)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):  # the hub cache's content-addressed blob
        return real.name
    stat = real.stat()
    version = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_path = cache_file()
    cache = _read_cache(cache_path)
    entry = cache.get(str(real))
    if entry and entry[:3] == version:
        return entry[3]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    cache = _read_cache(cache_path)  # another process may have added entries meanwhile
    cache[str(real)] = [*version, digest.hexdigest()]
    _write_cache(cache_path, cache)
    return digest.hexdigest()
