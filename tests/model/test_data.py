"""model/data.py: parquet rows -> samples, bad rows counted, transforms, tokenising, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.model.data import (
    Collator,
    Columns,
    EpochBatchSampler,
    EvalTransform,
    ImageTextDataset,
    TrainTransform,
    batches_per_epoch,
    id63,
)
from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD
from capfilt.model.tokenizer import build_tokenizer
from tests.tiny_blip import encode, row, write_shard

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210),
           (20, 20, 20), (250, 140, 0)]
# Captions that differ in most words, so even a freshly initialised text encoder tells them apart.
CAPTIONS = ["a red apple on the left.", "green grass in a field", "the blue sea under a clear sky",
            "yellow sunflowers in summer", "a purple plum on a table", "cyan water of a swimming pool",
            "a black cat at night", "oranges in a wooden bowl"]


def left_right_image(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    """A coloured block on the left half only, so a mirror image is told apart."""
    array = np.full((size, size, 3), 255, dtype=np.uint8)
    array[:, : size // 2] = colour
    return Image.fromarray(array)


# CapFilt-output-format parquet: input columns plus the `texts` list of kept texts.
CAPFILT_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("jpg", pa.binary()),
                            ("status", pa.string()), ("texts", pa.list_(pa.string()))])


def write_capfilt_shard(path: Path, rows: list[dict]) -> None:
    """`rows` (key, jpg, texts; caption "web text" unless given) as a CapFilt output shard."""
    write_shard(path, [{"caption": "web text", "status": "success", **r} for r in rows], CAPFILT_SCHEMA)


def make_input_dir(directory: Path, num_rows: int, shards: int = 2) -> Path:
    """`num_rows` good rows of coloured left-half images, each colour with its own caption."""
    rows = [row(f"{i:06d}", CAPTIONS[i % 8], encode(left_right_image(COLOURS[i % 8]))) for i in range(num_rows)]
    per = -(-num_rows // shards)
    for s in range(shards):
        write_shard(directory / f"{s:05d}.parquet", rows[s * per:(s + 1) * per])
    return directory


def test_input_rows_skipped_and_counted(tmp_path):
    good = encode(left_right_image(COLOURS[0]))
    truncated = encode(left_right_image(COLOURS[1]), "JPEG")[:200]
    rows = [
        row("a", "first", good),
        row("b", "failed download", None, "failed_to_download"),
        row("c", "no image", None, "success"),
        row("d", None, good),
        row("e", "...", good),  # nothing left after cleaning
        row("f", "truncated", truncated),
        row("g", "last one", good),
    ]
    write_shard(tmp_path / "in" / "0.parquet", rows)
    dataset = ImageTextDataset([tmp_path / "in"], EvalTransform(16))
    assert dataset.skipped == {"status": 1, "no_image": 1, "bad_text": 0, "no_text": 2, "schema": 0}
    assert len(dataset) == 3 and dataset.read == len(dataset) + sum(dataset.skipped.values())
    assert dataset.formats == {str(tmp_path / "in" / "0.parquet"): "input"}
    assert dataset.texts == [["first"], ["truncated"], ["last one"]]
    # Row 1 does not decode: its slot is filled by the next row and the failure reported.
    sample = dataset[(1, 0)]
    assert sample["decode_failed"] == [(1, "corrupt")] and sample["text"] == "last one"
    assert sample["idx"] == id63(good) == dataset[(0, 0)]["idx"]  # rows a and g: one image, one id
    assert dataset[(0, 0)]["decode_failed"] == []


def test_missing_column_named(tmp_path):
    write_shard(tmp_path / "in" / "0.parquet", [row("a", "x", b"1")])
    with pytest.raises(ValueError, match=r"no usable rows.*'schema': 1.*'image' \(run.columns.image\) is missing"):
        ImageTextDataset([tmp_path / "in"], EvalTransform(16), Columns(image="image"))
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        ImageTextDataset([tmp_path], EvalTransform(16))


def test_capfilt_texts_sampled_per_seed_epoch_row(tmp_path):
    jpg = encode(left_right_image(COLOURS[2]))
    texts = [f"text {i}" for i in range(5)]
    rows = [{"key": f"k{r}", "jpg": jpg, "texts": texts} for r in range(8)]
    rows.append({"key": "empty", "jpg": jpg, "texts": []})
    # A CapFilt output root resolves to its data/ directory.
    write_capfilt_shard(tmp_path / "out" / "data" / "0.parquet", rows)
    dataset = ImageTextDataset([tmp_path / "out"], EvalTransform(16), seed=3)
    assert len(dataset) == 8 and dataset.skipped["no_text"] == 1
    assert set(dataset.formats.values()) == {"capfilt"}

    def epoch_texts(ds, epoch):
        return [ds[(row, epoch)]["text"] for row in range(len(ds))]

    again = ImageTextDataset([tmp_path / "out"], EvalTransform(16), seed=3)
    assert epoch_texts(dataset, 0) == epoch_texts(again, 0)  # a function of (seed, epoch, row)
    assert epoch_texts(dataset, 0) != epoch_texts(dataset, 1)
    other_seed = ImageTextDataset([tmp_path / "out"], EvalTransform(16), seed=4)
    assert epoch_texts(dataset, 0) != epoch_texts(other_seed, 0)
    seen = {t for e in range(6) for t in epoch_texts(dataset, e)}
    assert seen == set(texts)
    assert {dataset[(row, 2)]["idx"] for row in range(len(dataset))} == {id63(jpg)}  # one image, one id


def test_mixed_formats_concatenate_with_row_ids(tmp_path):
    make_input_dir(tmp_path / "human", 6, shards=1)
    jpg = encode(left_right_image(COLOURS[3]))
    write_capfilt_shard(tmp_path / "web" / "0.parquet",
                        [{"key": f"w{i}", "jpg": jpg, "texts": ["a", "b"]} for i in range(4)])
    dataset = ImageTextDataset([tmp_path / "human", tmp_path / "web"], EvalTransform(16))
    assert len(dataset) == 10
    assert sorted(dataset.formats.values()) == ["capfilt", "input"]
    assert dataset[(7, 0)]["text"] in {"a", "b"}
    # Sample ids name the image across files: the web rows show human row 3's image.
    ids = [dataset[(row, 0)]["idx"] for row in range(len(dataset))]
    assert ids[6:] == [ids[3]] * 4 and len(set(ids[:6])) == 6


def test_train_transform_shapes_determinism_and_flip(tmp_path):
    make_input_dir(tmp_path / "in", 4, shards=1)
    transform = TrainTransform(24, hflip=False)
    dataset = ImageTextDataset([tmp_path / "in"], transform)
    a, b = dataset[(1, 0)]["image"], dataset[(1, 0)]["image"]
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same (seed, epoch, row): same augmentation
    assert not torch.equal(a, dataset[(1, 1)]["image"])  # a new epoch draws a new view

    # With the crop and RandAugment neutralised, flip=False never mirrors; flip=True sometimes does.
    image = left_right_image(COLOURS[0], 24)
    plain = EvalTransform(24)(image)
    mirrored = torch.flip(plain, dims=[2])
    for hflip in (False, True):
        transform = TrainTransform(24, hflip=hflip, randaug_ops=0, crop_scale=(1.0, 1.0))
        outputs = [transform(image, np.random.default_rng(s)) for s in range(16)]
        flips = sum(torch.allclose(o, mirrored, atol=1e-5) for o in outputs)
        plains = sum(torch.allclose(o, plain, atol=1e-5) for o in outputs)
        assert flips + plains == len(outputs)
        assert (flips > 0) == hflip


def test_eval_transform_normalises_with_blip_mean_std():
    pixels = EvalTransform(8)(Image.new("RGB", (20, 10), (255, 0, 128)))
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGE_MEAN, IMAGE_STD)]
    assert pixels.shape == (3, 8, 8)
    assert torch.allclose(pixels.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)


def test_randaug_changes_images():
    image = left_right_image(COLOURS[4], 24)
    transform = TrainTransform(24, randaug_ops=2, randaug_magnitude=9, crop_scale=(1.0, 1.0))
    plain = EvalTransform(24)(image)
    changed = sum(not torch.allclose(transform(image, np.random.default_rng(s)), plain, atol=1e-4)
                  for s in range(20))
    assert changed >= 5


def test_collator_tokenises_and_counts_prompt_tokens():
    tokenizer = build_tokenizer()
    samples = [{"image": torch.zeros(3, 8, 8), "text": "a red circle", "idx": 4, "decode_failed": []},
               {"image": torch.ones(3, 8, 8), "text": "a big blue square on the left", "idx": 9,
                "decode_failed": [(8, "format")]}]
    batch = Collator(tokenizer, max_text_len=35, prompt="a picture of ")(samples)
    assert batch["lm_prompt_len"] == 3
    prompt_ids = tokenizer("a picture of", add_special_tokens=False).input_ids
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert batch["input_ids"][:, 1:4].tolist() == [prompt_ids, prompt_ids]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)  # longest: 10 words + CLS/SEP
    assert batch["attention_mask"][0].sum() == 8 and batch["input_ids"][0, 8] == tokenizer.pad_token_id
    assert batch["idx"].tolist() == [4, 9] and batch["decode_failed"] == [(8, "format")]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    short = Collator(tokenizer, max_text_len=5)(samples)
    assert short["lm_prompt_len"] == 0 and short["input_ids"].shape == (2, 5)
    assert short["input_ids"][1, -1] == tokenizer.sep_token_id


def test_sampler_shards_ranks_and_resumes():
    n, batch, world = 23, 3, 2
    per_rank = [list(EpochBatchSampler(n, batch, seed=1, epoch=0, rank=r, world_size=world))
                for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == batches_per_epoch(n, batch, world) == 3
    rows = [key[0] for sampler in per_rank for b in sampler for key in b]
    assert len(rows) == len(set(rows)) == 18  # disjoint across ranks, ragged tail dropped
    assert all(key[1] == 0 for b in per_rank[0] for key in b)
    resumed = list(EpochBatchSampler(n, batch, seed=1, epoch=0, rank=0, world_size=world, start_batch=2))
    assert resumed == per_rank[0][2:]
    assert list(EpochBatchSampler(n, batch, 1, 0, num_batches=2)) == list(EpochBatchSampler(n, batch, 1, 0))[:2]
    epoch1 = list(EpochBatchSampler(n, batch, seed=1, epoch=1, rank=0, world_size=world))
    assert [k[0] for b in epoch1 for k in b] != [k[0] for b in per_rank[0] for k in b]
    assert all(k[1] == 1 for b in epoch1 for k in b)


# ---------------------------------------------------------------------------------------------
# Sample ids and hostile rows


def test_sample_ids_name_the_image_from_its_bytes_or_a_column(tmp_path):
    """COCO-style data (one row per caption): the captions of one image share a sample id."""
    red, blue = encode(left_right_image(COLOURS[0])), encode(left_right_image(COLOURS[2]))
    rows = [row("a", "a red block", red), row("b", "red on the left", red),
            row("c", "a blue block", blue)]
    write_shard(tmp_path / "in" / "0.parquet", rows)
    dataset = ImageTextDataset([tmp_path / "in"], EvalTransform(16))
    ids = [dataset[(row, 0)]["idx"] for row in range(3)]
    assert ids[0] == ids[1] == id63(red) and ids[2] == id63(blue) != ids[0]

    # A column naming the image wins over the bytes (re-encoded copies of one image, say);
    # a null value falls back to the bytes.
    table = pq.read_table(tmp_path / "in" / "0.parquet").append_column("img_id", pa.array([7, None, 7], pa.int64()))
    (tmp_path / "ids").mkdir()
    pq.write_table(table, tmp_path / "ids" / "0.parquet")
    by_column = ImageTextDataset([tmp_path / "ids"], EvalTransform(16), Columns(image_id="img_id"))
    ids = [by_column[(row, 0)]["idx"] for row in range(3)]
    assert ids[0] == ids[2] != ids[1] and ids[1] == id63(red)
    # The trainer's key for it: train.image_id_column.
    from capfilt.model.train import TrainConfig, build_dataset

    built = build_dataset([tmp_path / "ids"], TrainConfig(image_id_column="img_id"), 16, augment=False)
    assert [built[(row, 0)]["idx"] for row in range(3)] == ids
    with pytest.raises(ValueError, match=r"'img_id' \(train.image_id_column\) is missing"):
        ImageTextDataset([tmp_path / "in"], EvalTransform(16), Columns(image_id="img_id"))


def test_hostile_captions_and_shards_are_counted_not_fatal(tmp_path):
    good = encode(left_right_image(COLOURS[1]))
    # A binary caption column decodes per row; invalid UTF-8 is skipped as bad_text.
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"caption": pa.array(["un café".encode(), b"bad \xff", None], pa.binary()),
                             "jpg": pa.array([good] * 3, pa.binary()),
                             "status": pa.array(["success", "success", None])}),  # null status: not reported
                   tmp_path / "in" / "0.parquet")
    pq.write_table(pa.table({"caption": ["no image column"]}), tmp_path / "in" / "1.parquet")
    pq.write_table(pa.table({"caption": ["int status"], "jpg": pa.array([good], pa.binary()), "status": [200]}),
                   tmp_path / "in" / "2.parquet")
    dataset = ImageTextDataset([tmp_path / "in"], EvalTransform(16))
    assert dataset.texts == [["un café"]]
    assert dataset.skipped == {"status": 0, "no_image": 0, "bad_text": 1, "no_text": 1, "schema": 2}
    assert dataset.read == 5 == len(dataset) + sum(dataset.skipped.values())
    assert "'jpg' (run.columns.image) is missing" in dataset.problems[str(tmp_path / "in" / "1.parquet")]
    assert "is not a string" in dataset.problems[str(tmp_path / "in" / "2.parquet")]


# ---------------------------------------------------------------------------------------------
# RandAugment and crop, op family by op family against BLIP's transform/randaugment.py


def _photo(side: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(30, 220, (side, side, 3), dtype=np.uint8))


def test_randaug_enhance_ops_use_blips_unsigned_factor():
    from capfilt.model.data import RANDAUG_OPS, enhance_factor
    from PIL import ImageEnhance

    image = _photo()
    assert enhance_factor(5) == pytest.approx(1.0) and enhance_factor(10) == pytest.approx(1.9)
    assert enhance_factor(0) == pytest.approx(0.1)
    for name, enhancer in (("brightness", ImageEnhance.Brightness), ("sharpness", ImageEnhance.Sharpness)):
        # BLIP's level 5: factor 1.0, the identity.
        assert np.array_equal(np.asarray(RANDAUG_OPS[name](image, 5, np.random.default_rng(0))), np.asarray(image))
        # Another level: one factor whatever the draw (no sign), BLIP's 0.1 + 1.8 * level / 10.
        outputs = {RANDAUG_OPS[name](image, 8, np.random.default_rng(s)).tobytes() for s in range(8)}
        assert outputs == {enhancer(image).enhance(0.1 + 1.8 * 0.8).tobytes()}


def test_randaug_shear_and_rotate_are_signed_with_blips_fill():
    from capfilt.model.data import RANDAUG_OPS

    image = Image.new("RGB", (32, 32), (0, 200, 0))
    for name, expected in (
        ("shear_x", [image.transform(image.size, Image.AFFINE, (1, s, 0, 0, 1, 0), Image.BILINEAR,
                                     fillcolor=(128, 128, 128)) for s in (0.15, -0.15)]),
        ("shear_y", [image.transform(image.size, Image.AFFINE, (1, 0, 0, s, 1, 0), Image.BILINEAR,
                                     fillcolor=(128, 128, 128)) for s in (0.15, -0.15)]),
        ("rotate", [image.rotate(a, Image.BILINEAR, fillcolor=(128, 128, 128)) for a in (15, -15)]),
    ):
        outputs = [RANDAUG_OPS[name](image, 5, np.random.default_rng(s)).tobytes() for s in range(16)]
        assert set(outputs) == {e.tobytes() for e in expected}, name  # 0.3 / 30 degrees x level 5/10, both signs
        # The comparison covers the fill: uncovered pixels are BLIP's replace_value (128, 128, 128).
        assert all((np.asarray(e) == 128).all(axis=2).sum() >= 16 for e in expected), name


@pytest.mark.parametrize("side", [32, 96])
def test_randaug_translate_moves_blips_pixels_not_a_share(side):
    from capfilt.model.data import RANDAUG_OPS

    image = Image.new("RGB", (side, side), (0, 0, 250))
    for name, axis in (("translate_x", 1), ("translate_y", 0)):
        shifts = set()
        for seed in range(16):
            out = np.asarray(RANDAUG_OPS[name](image, 5, np.random.default_rng(seed)))
            grey = (out == 128).all(axis=2).all(axis=1 - axis)  # whole grey lines across the other axis
            assert grey.sum() == 5, (name, side)  # 10 px x level 5/10, whatever the side
            shifts.add(bool(grey[0]))
        assert shifts == {True, False}, name  # both directions


def test_randaug_plain_ops_are_pils():
    from capfilt.model.data import RANDAUG_OPS
    from PIL import ImageOps

    image = _photo(seed=3)
    rng = np.random.default_rng(0)
    assert RANDAUG_OPS["identity"](image, 5, rng) is image
    assert RANDAUG_OPS["autocontrast"](image, 5, rng).tobytes() == ImageOps.autocontrast(image).tobytes()
    assert RANDAUG_OPS["equalize"](image, 5, rng).tobytes() == ImageOps.equalize(image).tobytes()
    assert set(RANDAUG_OPS) == {"identity", "autocontrast", "brightness", "sharpness", "equalize", "shear_x",
                                "shear_y", "translate_x", "translate_y", "rotate"}  # BLIP's augs list


def test_randaug_draws_with_replacement_each_kept_with_probability_half():
    from capfilt.model.data import RANDAUG_OP_NAMES, randaug_draw

    draws = [randaug_draw(np.random.default_rng(seed), 2) for seed in range(4000)]
    applied = sum(len(d) for d in draws) / len(draws)
    assert applied == pytest.approx(1.0, abs=0.05)  # 2 ops x 0.5
    twice = sum(len(d) == 2 and d[0] == d[1] for d in draws) / len(draws)
    assert twice == pytest.approx(0.25 / len(RANDAUG_OP_NAMES), abs=0.01)  # np.random.choice's replacement
    assert {name for d in draws for name in d} == set(RANDAUG_OP_NAMES)


def test_crop_box_falls_back_like_torchvision():
    from capfilt.model.data import crop_box

    # No crop of 90-100% of a 400x10 strip has an aspect ratio within [3/4, 4/3]: torchvision
    # then takes the centre with the ratio clamped to 4/3 (13 x 10), not a square.
    assert crop_box(400, 10, (0.9, 1.0), np.random.default_rng(0)) == (193, 0, 206, 10)
    assert crop_box(10, 400, (0.9, 1.0), np.random.default_rng(0)) == (0, 193, 10, 206)
    left, top, right, bottom = crop_box(100, 100, (0.2, 0.2), np.random.default_rng(1))
    assert (right - left) * (bottom - top) == pytest.approx(2000, rel=0.05)


def test_captions_of_one_image_are_itc_positives_and_never_each_others_itm_negative(tmp_path, monkeypatch):
    """Two rows sharing one image (COCO-style human data): one sample id, so ITC's targets give
    them equal weight and ITM never draws one as the other's hard negative."""
    from capfilt.model import med as med_module
    from capfilt.model.med import MED, contrastive_targets, med_config

    red, blue, green = (encode(left_right_image(COLOURS[i])) for i in (0, 2, 1))
    write_shard(tmp_path / "in" / "0.parquet", [
        row("a", "a red block on the left", red),
        row("b", "something red beside white", red),
        row("c", "a blue block", blue), row("d", "green grass", green)])
    dataset = ImageTextDataset([tmp_path / "in"], EvalTransform(32))
    batch = Collator(build_tokenizer(), max_text_len=16)([dataset[(row, 0)] for row in range(4)])
    idx = batch["idx"]
    assert idx[0] == idx[1] and len(set(idx.tolist())) == 3
    targets = contrastive_targets(idx, idx)  # [4, 4]
    torch.testing.assert_close(targets[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))

    draws = []
    real_sample = med_module.sample_hard_negatives

    def recording(sim, positive):
        columns, has_negative = real_sample(sim, positive)
        draws.append(columns.tolist())
        return columns, has_negative

    monkeypatch.setattr(med_module, "sample_hard_negatives", recording)
    torch.manual_seed(0)
    model = MED(med_config("tiny", image_size=32, patch_size=8, vision_hidden=64, vision_layers=1, vision_heads=2,
                           vision_mlp=128, text_hidden=64, text_layers=1, text_heads=2, text_intermediate=128,
                           embed_dim=16, queue_size=8))
    for _ in range(30):
        model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], idx, alpha=0.4, itc=False, lm=False)
    assert len(draws) == 60  # a negative text per image and a negative image per text, each forward
    assert all(d[0] not in (0, 1) and d[1] not in (0, 1) for d in draws)
    assert {d[0] for d in draws} == {2, 3}  # the draw itself is live: both other images occur
