"""capfilt/digests.py: weight files hashed once per file version, hub blobs by their name."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from capfilt import digests
from capfilt.digests import CACHE_ENV, file_sha256


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def no_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr(digests, "open", refuse, raising=False)


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3 * digests.CHUNK // 2))  # more than one chunk
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert file_sha256(weights) == expected
    with monkeypatch.context() as patched:
        no_reading(patched)
        assert file_sha256(weights) == expected  # from the cache
        link = tmp_path / "link.safetensors"
        link.symlink_to(weights)
        assert file_sha256(link) == expected  # cached under the real path
    weights.write_bytes(b"other weights")  # rewritten: another version
    assert file_sha256(weights) == hashlib.sha256(b"other weights").hexdigest()


def test_a_torn_cache_is_hashed_again(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    digests.cache_file().parent.mkdir(parents=True)
    digests.cache_file().write_text('{"torn": [1, 2')
    assert file_sha256(weights) == hashlib.sha256(b"weights").hexdigest()
    assert str(weights.resolve()) in json.loads(digests.cache_file().read_text())


def test_a_hub_blob_is_named_by_its_digest(tmp_path, monkeypatch):
    digest = hashlib.sha256(b"lfs weights").hexdigest()
    blob = tmp_path / "models--org--name" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"lfs weights")
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    no_reading(monkeypatch)
    assert file_sha256(snapshot / "model.safetensors") == digest
