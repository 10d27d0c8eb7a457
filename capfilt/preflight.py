"""Storage checks before any work: the keys, the buckets and the permissions a command needs.

A command that reads an object-store input and writes an object-store output checks both before
it loads a model or starts Ray, so a wrong key, a missing bucket or read-only keys cost a second
and one line, not a cluster's start-up and a failure deep in a worker:

- an input is listed, and the first file found is read (its last bytes: a parquet footer's);
- an output is listed, and gets a probe object written under it and removed again (with the empty
  folder markers pyarrow would leave behind), so a run that fails here leaves nothing.

Each failure is a `PreflightError` naming the flag, the URI and the cause in words (the access key
is unknown, the secret does not match it, the bucket does not exist, the keys may not read or
write there, no credentials were found), with the store's own error code. Local paths are left to
the commands' own checks (a missing folder, a busy output).
"""

from __future__ import annotations

import re
import uuid

import pyarrow.fs as pafs

from capfilt.storage import Location, glob_files, is_glob, location

PROBE = ".capfilt-probe-"  # name prefix of the probe object written under an output

_CAUSES = (  # the store's error code -> the cause in words
    ("INVALID_ACCESS_KEY_ID", "the access key is not known to the store (AWS_ACCESS_KEY_ID, AWS_PROFILE)"),
    ("SIGNATURE_DOES_NOT_MATCH", "the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)"),
    ("INVALID_TOKEN|EXPIRED_TOKEN|TokenRefreshRequired", "the session token is invalid or expired (AWS_SESSION_TOKEN)"),
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("ACCESS_DENIED", "access denied: these keys may not {action} here"),
)
# pyarrow's AWS client fails this way, before any request, when no credential source gave it keys
_NO_CREDENTIALS = re.compile(r"INTERNAL_FAILURE during \w+ operation: ?$")


class PreflightError(ValueError):
    """Storage a command needs is not usable with the keys it has; the message names the URI and the cause."""


def cause(err: BaseException, action: str) -> str:
    """A storage error as words a user can act on, with the store's code."""
    text = " ".join(str(err).split())
    code = re.search(r"AWS Error (\w+)", text)
    if _NO_CREDENTIALS.search(text):
        return ("no credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                "or run where an instance role applies)")
    for pattern, words in _CAUSES:
        if re.search(pattern, text):
            return f"{words.format(action=action)} ({code.group(0) if code else pattern})"
    return text[:400]


def check_input(spec: str, flag: str) -> None:
    """The input (a folder, prefix or glob) can be listed and its first file read."""
    if not spec or "://" not in spec:
        return
    parts = spec.split("/")
    root = location("/".join(parts[:next(i for i, p in enumerate(parts) if is_glob(p))]) if is_glob(spec) else spec)
    if root.local:
        return
    try:
        listed = root.listing()
    except OSError as err:
        raise PreflightError(f"{flag} {spec}: cannot list it: {cause(err, 'list')}") from None
    if not listed:
        _check_bucket(root, spec, flag)
        return  # an empty or missing prefix: the command's own check says so
    files = glob_files(spec) if is_glob(spec) else [root.at(f) for f in listed if f.type == pafs.FileType.File]
    if not files:
        return
    first = files[0]
    try:
        with first.open_input_file() as handle:
            size = handle.size()
            handle.seek(max(0, size - 8))
            handle.read()
    except OSError as err:
        raise PreflightError(f"{flag} {spec}: cannot read {first}: {cause(err, 'read')}") from None


def check_output(spec: str, flag: str) -> None:
    """A probe object can be written under the output (a folder or prefix), listed and removed."""
    if not spec or "://" not in str(spec):
        return
    out = location(spec)
    if out.local:
        return
    try:
        top = _topmost_empty(out)
    except OSError as err:
        raise PreflightError(f"{flag} {spec}: cannot list it: {cause(err, 'list')}") from None
    probe = out / f"{PROBE}{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
    except OSError as err:
        raise PreflightError(f"{flag} {spec}: cannot write there: {cause(err, 'write')}") from None
    try:
        # with a fresh prefix: the probe and the empty folder markers pyarrow leaves when its last object goes
        (probe if top is None else top).delete()
    except OSError as err:
        raise PreflightError(f"{flag} {spec}: can write but not delete there ({probe} may be left): "
                             f"{cause(err, 'delete')}") from None


def _topmost_empty(out: Location) -> Location | None:
    """The highest prefix from `out` up (below the bucket) that holds no object; None if `out` holds some."""
    if out.listing():
        return None
    top = out
    while top.parent.path.strip("/") != top.authority and not top.parent.listing():
        top = top.parent
    return top


def _check_bucket(root: Location, spec: str, flag: str) -> None:
    bucket = Location(root.fs, root.authority, root.scheme, root.authority)
    try:
        missing = bucket.info().type == pafs.FileType.NotFound
    except OSError:
        return  # the keys may not look at the bucket itself; the listing worked
    if missing:
        raise PreflightError(f"{flag} {spec}: the bucket {root.authority} does not exist")


def check(inputs: dict[str, str] | None = None, outputs: dict[str, str] | None = None) -> None:
    """Check every input (flag -> URI) and output before a command does any work."""
    for flag, spec in (inputs or {}).items():
        check_input(str(spec), flag)
    for flag, spec in (outputs or {}).items():
        check_output(str(spec), flag)
