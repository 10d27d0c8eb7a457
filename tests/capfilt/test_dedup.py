"""`capfilt dedup`: the greedy near-duplicate rule on controlled features, decontamination, and a
whole run on a tiny filter where exact and re-encoded duplicates must go and counts reconcile."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from capfilt.config import load_config
from capfilt.dedup import REASON, contaminated, dedup, near_duplicates
from tests.tiny_blip import INPUT_SCHEMA, WIDE_SPREAD, encode, image_bytes, row, save_filter, write_shard

THRESHOLD = 0.999  # distinct random pictures stay below this cosine under the tiny random filter


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_greedy_keeps_first_key_and_never_chains():
    # a ~ b (0.96), b ~ c (0.96), a !~ c (0.84): a is kept, b goes, c stays (nothing kept is close).
    # Rows are stored out of key order; key order decides.
    angle = np.arccos(0.96)
    at = {"a": 0, "b": 1, "c": 2}
    keys = ["b", "c", "a", "d"]
    feats = _unit([[np.cos(at[k] * angle), np.sin(at[k] * angle)] for k in keys[:3]] + [[-1.0, 0.0]])
    assert near_duplicates(feats, keys, threshold=0.95) == {0: "near_duplicate_of:a"}
    assert near_duplicates(feats, keys, threshold=0.95, skip={2}) == {1: "near_duplicate_of:b"}


def test_threshold_is_inclusive_and_chunking_changes_nothing():
    pair = _unit([[1.0, 0.0], [0.5, np.sqrt(0.75)]])  # cosine exactly 0.5
    assert near_duplicates(pair, ["x", "y"], threshold=0.5) == {1: "near_duplicate_of:x"}
    assert near_duplicates(pair, ["x", "y"], threshold=0.5001) == {}
    rng = np.random.default_rng(0)
    feats = _unit(rng.normal(size=(200, 4)))
    keys = [f"k{i:03d}" for i in rng.permutation(200)]
    whole = near_duplicates(feats, keys, threshold=0.97, query_batch=4096)
    assert whole == near_duplicates(feats, keys, threshold=0.97, query_batch=7)
    # Brute force: visit in key order, drop rows close to any kept row.
    kept = []
    expected = {}
    for i in sorted(range(200), key=lambda i: keys[i]):
        close = [j for j in kept if feats[i] @ feats[j] >= 0.97]
        if close:
            expected[i] = f"near_duplicate_of:{keys[close[0]]}"
        else:
            kept.append(i)
    assert set(whole) == set(expected) and len(whole) > 10
    kept_feats = feats[[i for i in range(200) if i not in whole]]
    sims = kept_feats @ kept_feats.T
    assert (sims[~np.eye(len(kept_feats), dtype=bool)] < 0.97).all()


def test_contaminated_names_the_closest_eval_image():
    web = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    evals = _unit([[0, 0.2, 1], [0, 1, 0.01]])
    assert contaminated(web, evals, ["e0", "e1"], threshold=0.95) == {1: "contaminates:e1", 2: "contaminates:e0"}
    assert contaminated(web, evals[:0], [], threshold=0.95) == {}


def _png(jpeg: bytes) -> bytes:
    """The same pixels in another container: a byte hash would miss it, the embedding must not."""
    return encode(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    save_filter(root / "filter", spread=WIDE_SPREAD)
    pics = {i: image_bytes(i) for i in range(8)}
    # shard 0: w000..w004; shard 1: w005..w009 (keys sort across shards)
    web = {
        "w000": pics[0], "w001": pics[1], "w002": pics[2], "w003": pics[3], "w004": pics[1],  # w004 = w001
        "w005": None,  # failed download: kept, not compared
        "w006": _png(pics[2]),  # w002 re-encoded
        "w007": b"\x89PNG broken",  # undecodable: kept, not compared
        "w008": pics[5], "w009": pics[6],
    }
    rows = [{**row(k, f"caption {k}", web[k]), "extra_col": i} for i, k in enumerate(web)]
    with_extra = INPUT_SCHEMA.append(pa.field("extra_col", pa.int64()))
    write_shard(root / "web" / "00000.parquet", rows[:5], with_extra)
    write_shard(root / "web" / "00001.parquet", rows[5:], with_extra)
    write_shard(root / "eval" / "00000.parquet", [row("e0", "x", _png(pics[3])), row("e1", "y", image_bytes(99))])
    return root


def test_dedup_removes_duplicates_and_contamination(corpus, tmp_path):
    cfg = load_config(None, [f"dedup.threshold={THRESHOLD}", "dedup.batch_size=3"])
    stats = dedup(corpus / "web", tmp_path / "out", corpus / "filter", cfg, against=corpus / "eval")
    removed = {}
    for path in sorted((tmp_path / "out" / "removed").glob("*.parquet")):
        t = pq.read_table(path)
        removed |= dict(zip(t["key"].to_pylist(), t[REASON].to_pylist()))
    assert removed == {"w004": "near_duplicate_of:w001", "w006": "near_duplicate_of:w002",
                       "w003": "contaminates:e0"}
    kept = []
    for name in ("00000.parquet", "00001.parquet"):
        source = pq.read_table(corpus / "web" / name)
        data = pq.read_table(tmp_path / "out" / "data" / name)
        assert data.schema == source.schema  # input schema kept, extra columns included
        assert pq.read_table(tmp_path / "out" / "removed" / name).schema.names == source.schema.names + [REASON]
        kept += data["key"].to_pylist()
        # A kept row is the input row, byte for byte.
        src = {r["key"]: r for r in source.to_pylist()}
        assert all(r == src[r["key"]] for r in data.to_pylist())
    assert sorted(kept) == ["w000", "w001", "w002", "w005", "w007", "w008", "w009"]
    assert stats["read"] == 10 == stats["kept"] + stats["removed"]
    assert (stats["kept"], stats["removed"], stats["near_duplicate"], stats["contaminated"]) == (7, 3, 2, 1)
    assert stats["not_compared"] == {"download": 1, "decode": 1}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["read"] == 10
    assert load_config(tmp_path / "out" / "config.yaml").dedup.threshold == THRESHOLD
    with pytest.raises(FileExistsError, match="--overwrite"):
        dedup(corpus / "web", tmp_path / "out", corpus / "filter", cfg)


def test_dedup_cli(corpus, tmp_path):
    from capfilt.cli import app

    res = CliRunner().invoke(app, ["dedup", "--input", str(corpus / "web"), "--out", str(tmp_path / "o"),
                                   "--filter", str(corpus / "filter"), "--threshold", str(THRESHOLD)])
    assert res.exit_code == 0, res.output
    assert "read 10  kept 8  removed 2 (near-duplicates 2, contaminating 0)" in res.output
    bad = CliRunner().invoke(app, ["dedup", "--input", str(corpus / "web"), "--out", str(tmp_path / "p"),
                                   "--filter", str(corpus / "filter"), "--threshold", "1.5"])
    assert bad.exit_code == 1 and "dedup.threshold" in bad.output
