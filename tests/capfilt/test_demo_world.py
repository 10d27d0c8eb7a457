"""The demo world: deterministic, img2dataset-shaped shards, truth kept apart and consistent."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from capfilt import demo_world as dw
from capfilt.cli import app
from capfilt.config import ConfigError, DemoConfig

SMALL = DemoConfig(seed=7, num_human=20, num_web=80, num_test=10, rows_per_shard=32,
                   failed_share=0.05)
IMG2DATASET_COLUMNS = ["key", "url", "caption", "jpg", "status", "error_message", "width",
                       "height", "original_width", "original_height"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    dw.write_world(SMALL, out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _shard_rows(world: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(world / split).to_pylist() for split in dw.SPLITS}


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(world, tmp_path):
    dw.write_world(SMALL, tmp_path / "again")
    dw.write_world(replace(SMALL, seed=8), tmp_path / "other")
    first, again, other = _files(world), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first.keys() == again.keys() == other.keys()
    assert "truth.parquet" in first and "web/00002.parquet" in first
    assert first == again
    assert all(first[name] != other[name] for name in first)


def test_a_rows_scene_does_not_depend_on_the_size_of_the_world():
    small = dw.plan_rows(SMALL)
    large = dw.plan_rows(replace(SMALL, num_test=50))
    assert [r.scene for r in small if r.split == "human"] == \
        [r.scene for r in large if r.split == "human"]


# --- shards --------------------------------------------------------------------------------


def test_shards_have_img2dataset_layout_and_decodable_images(world):
    for split, count in (("human", 20), ("web", 80), ("test", 10)):
        names = sorted(p.name for p in (world / split).glob("*.parquet"))
        assert names == [f"{i:05d}.parquet" for i in range(math.ceil(count / 32))]
        sizes = [pq.read_metadata(world / split / n).num_rows for n in names]
        assert sizes[:-1] == [32] * (len(sizes) - 1) and sum(sizes) == count
    rows = [r for split_rows in _shard_rows(world).values() for r in split_rows]
    table = pq.read_table(world / "web" / "00000.parquet")
    assert set(IMG2DATASET_COLUMNS) <= set(table.column_names)
    assert table.schema == dw.SHARD_SCHEMA
    # Ground truth never leaks into the shards.
    assert not {"noise", "clean_caption", "objects", "split"} & set(table.column_names)
    for row in rows:
        assert re.fullmatch(r"\d{9}", row["key"]) and row["url"].startswith("https://")
        if row["status"] == "success":
            image = Image.open(io.BytesIO(row["jpg"]))
            assert image.format == "JPEG" and image.size == (64, 64)
            image.load()
            assert row["width"] == row["height"] == 64 and row["error_message"] is None
        else:
            assert row["status"] == "failed_to_download"
            assert row["jpg"] is None and row["width"] is None and row["error_message"]
            assert row["caption"]  # img2dataset keeps the caption of a URL it could not fetch
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys) == 110


def test_images_draw_the_named_scene():
    """The pixel under a single object has its colour, a corner the background's."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        scene = dw.sample_scene(rng, two_object_share=0.0)
        obj = scene.objects[0]
        if obj.size != "large" or obj.shape in ("ring", "star"):  # a ring's centre is hollow
            continue
        pixels = np.asarray(dw.render_image(scene, 64, rng, pixel_noise=4.0), dtype=float)
        fx, fy = dw.POSITIONS[obj.position]
        centre = pixels[round(fy * 64) - 1: round(fy * 64) + 2, round(fx * 64) - 1: round(fx * 64) + 2]
        assert np.abs(centre.mean((0, 1)) - dw.COLOURS[obj.colour]).max() < 40, scene
        assert np.abs(pixels[:4, :4].mean((0, 1)) - dw.BACKGROUNDS[scene.background]).max() < 30
        checked += 1
    assert checked > 20


# --- truth ---------------------------------------------------------------------------------


def test_truth_is_separate_complete_and_consistent(world):
    truth = dw.load_truth(world / "truth.parquet")
    shards = _shard_rows(world)
    shard_keys = [r["key"] for rows in shards.values() for r in rows]
    assert sorted(shard_keys) == sorted(truth)  # every shard key in truth exactly once
    web = {r["key"]: r for r in shards["web"]}
    for split, rows in shards.items():
        for row in rows:
            t = truth[row["key"]]
            assert t.split == split
            if split != "web":
                assert t.noise == "clean" and row["caption"] == t.clean_caption
    noise = Counter(truth[k].noise for k in web)
    failed = round(SMALL.failed_share * SMALL.num_web)
    assert noise["failed"] == failed
    assert all((web[k]["status"] == "failed_to_download") == (truth[k].noise == "failed") for k in web)
    noisy = noise["mismatch"] + noise["swap"] + noise["junk"]
    assert abs(noisy / (SMALL.num_web - failed) - SMALL.noise) <= 1 / SMALL.num_web
    assert min(noise["mismatch"], noise["swap"], noise["junk"]) > 0
    for key, row in web.items():
        t = truth[key]
        if t.noise in ("clean", "failed"):
            assert row["caption"] == t.clean_caption
        elif t.noise == "swap":
            said = dw.parse_scene(row["caption"])
            assert said is not None and len(said.objects) == len(t.scene.objects)
            diffs = [(i, a) for i, (o, s) in enumerate(zip(t.scene.objects, said.objects))
                     for a in dw.OBJECT_ATTRIBUTES if getattr(o, a) != getattr(s, a)]
            diffs += [(None, "background")] if said.background != t.scene.background else []
            assert len(diffs) == 1 and diffs[0][1] == t.swap_attribute, (row["caption"], t)
        elif t.noise == "mismatch":
            source = truth[t.mismatch_key]
            assert source.key != key and source.split == "web" and source.scene != t.scene
            assert row["caption"] == source.clean_caption
        else:
            assert t.noise == "junk" and dw.parse_caption(row["caption"]) == set()


def test_load_truth_refuses_a_file_that_is_not_truth(world):
    with pytest.raises(KeyError, match="not a demo-world truth file"):
        dw.load_truth(world / "web" / "00000.parquet")


# --- captions ------------------------------------------------------------------------------


def test_parse_caption_round_trips_every_template_and_synonym():
    rng = np.random.default_rng(1)
    for n_objects, templates in dw.TEMPLATES.items():
        for t in range(len(templates)):
            for _ in range(40):
                scene = dw.sample_scene(rng, two_object_share=float(n_objects == 2))
                style = ((t + 0.5) / len(templates),) + dw.caption_style(rng)[1:]
                caption = dw.render_caption(scene, style)
                assert caption == caption.lower()
                assert dw.parse_scene(caption) == scene, caption
                assert dw.parse_caption(caption) == dw.scene_attributes(scene), caption
    words = {w for table in dw.SYNONYMS.values() for phrases in table.values() for w in phrases}
    assert {"violet", "grey", "hoop", "big", "in the middle"} <= words


def test_parse_caption_reads_free_text_and_junk_names_nothing():
    assert dw.parse_caption("A BIG violet hoop, in the middle of grey!") == {
        ("size", "large"), ("colour", "purple"), ("shape", "ring"), ("position", "center"),
        ("background", "gray")}
    assert dw.parse_scene("a red circle") is None  # size, position, background unnamed
    rng = np.random.default_rng(2)
    assert all(dw.parse_caption(dw.junk_caption(rng)) == set() for _ in range(200))
    assert all(dw.parse_caption(junk) == set() for junk in dw.JUNK)


def test_captions_fit_blips_twenty_token_limit():
    from capfilt.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    captions = [r.clean_caption for r in dw.plan_rows(replace(SMALL, num_human=1500))]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions]
    assert max(lengths) <= 20


def test_swaps_pick_any_other_value_and_keep_the_scene_valid():
    """A swapped value is uniform over the alternatives, so no word marks a swapped caption."""
    rng = np.random.default_rng(3)
    one = dw.Scene((dw.SceneObject("small", "red", "star", "center"),), "white")
    colours = Counter(dw.swap_attribute(one, "colour", rng).objects[0].colour for _ in range(1400))
    assert set(colours) == set(dw.COLOURS) - {"red"} and min(colours.values()) > 150
    positions = Counter(dw.swap_attribute(one, "position", rng).objects[0].position
                        for _ in range(800))
    assert set(positions) == {"left", "right", "top", "bottom"} and min(positions.values()) > 150
    two = dw.Scene((dw.SceneObject("small", "red", "star", "left"),
                    dw.SceneObject("large", "blue", "ring", "right")), "black")
    for _ in range(100):
        moved = dw.swap_attribute(two, "position", rng)
        places = [o.position for o in moved.objects]
        assert len(set(places)) == 2 and "center" not in places and moved != two
    with pytest.raises(ValueError, match="texture"):
        dw.swap_attribute(one, "texture", rng)


def test_noise_is_not_separable_by_text_alone():
    """Swapped and mismatched captions read like clean ones; only junk gives itself away.

    A naive Bayes bag-of-words classifier trained on half the web rows scores the other half:
    clean vs swap/mismatch stays near chance, clean vs junk is easy (so the check can fail).
    """
    rows = [r for r in dw.plan_rows(replace(SMALL, num_human=0, num_test=0, num_web=3000))
            if r.noise != "failed"]
    noise = Counter(r.noise for r in rows)
    assert noise["junk"] < (noise["swap"] + noise["mismatch"]) / 2
    assert all(dw.parse_scene(r.caption) is not None for r in rows if r.noise in ("swap", "mismatch"))
    train, held_out = rows[::2], rows[1::2]

    def auc(negative: str, positive: set[str]) -> float:
        counts = {label: Counter() for label in (0, 1)}
        for r in train:
            if r.noise == negative or r.noise in positive:
                counts[int(r.noise in positive)].update(r.caption.lower().split())
        vocab = set(counts[0]) | set(counts[1])
        total = {label: sum(c.values()) + len(vocab) for label, c in counts.items()}

        def score(text: str) -> float:
            return sum(math.log((counts[1][w] + 1) / total[1]) - math.log((counts[0][w] + 1) / total[0])
                       for w in text.lower().split() if w in vocab)

        pos = [score(r.caption) for r in held_out if r.noise in positive]
        neg = [score(r.caption) for r in held_out if r.noise == negative]
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        return wins / (len(pos) * len(neg))

    assert abs(auc("clean", {"swap", "mismatch"}) - 0.5) < 0.08
    assert auc("clean", {"junk"}) > 0.95


# --- config and CLI ------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ({"noise": 1.5}, "demo.noise"),
    ({"swap_attributes": ("colour", "texture")}, "demo.swap_attributes"),
    ({"rows_per_shard": 0}, "demo.rows_per_shard"),
    ({"num_web": -1}, "demo.num_web"),
])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        dw.plan_rows(replace(SMALL, **override))


def test_cli_writes_world_and_config_and_refuses_to_clobber(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo-data", str(out), "--seed", "3", "--set", "demo.num_human=6",
            "--set", "demo.num_web=40", "--set", "demo.num_test=4", "--set", "demo.rows_per_shard=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "human: 6 rows (clean 6)" in result.output
    web_line = next(line for line in result.output.splitlines() if line.startswith("web: 40 rows"))
    assert all(f"{noise} " in web_line for noise in ("clean", "mismatch", "swap", "junk", "failed"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())["demo"]
    assert resolved["seed"] == 3 and resolved["num_web"] == 40
    assert len(list((out / "web").glob("*.parquet"))) == 3
    assert len(dw.load_truth(out / "truth.parquet")) == 50

    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    smaller = runner.invoke(app, args + ["--set", "demo.num_web=10", "--overwrite"])
    assert smaller.exit_code == 0, smaller.output
    assert sorted(p.name for p in (out / "web").glob("*.parquet")) == ["00000.parquet"]  # no stale shards
    assert pq.read_table(out / "web").num_rows == 10

    bad = runner.invoke(app, ["demo-data", str(tmp_path / "x"), "--set", "demo.nosie=0.3"])
    assert bad.exit_code == 1 and "demo.nosie" in bad.output
