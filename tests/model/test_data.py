"""model/data.py: parquet rows -> samples, bad rows counted, transforms, tokenising, sampling."""

from __future__ import annotations

import io
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
    DecodeLimits,
    EpochBatchSampler,
    EvalTransform,
    ImageDecodeError,
    ImageTextDataset,
    TrainTransform,
    batches_per_epoch,
    decode_image,
)
from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD
from capfilt.model.tokenizer import build_tokenizer

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210),
           (20, 20, 20), (250, 140, 0)]
# Captions that differ in most words, so even a freshly initialised text encoder tells them apart.
CAPTIONS = ["a red apple on the left.", "green grass in a field", "the blue sea under a clear sky",
            "yellow sunflowers in summer", "a purple plum on a table", "cyan water of a swimming pool",
            "a black cat at night", "oranges in a wooden bowl"]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def left_right_image(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    """A coloured block on the left half only, so a mirror image is told apart."""
    array = np.full((size, size, 3), 255, dtype=np.uint8)
    array[:, : size // 2] = colour
    return Image.fromarray(array)


def write_input_shard(path: Path, rows: list[dict]) -> None:
    """img2dataset-format parquet: key, url, caption, jpg, status, error_message, sizes."""
    table = pa.table({
        "key": [r["key"] for r in rows],
        "url": [f"http://example.invalid/{r['key']}.png" for r in rows],
        "caption": pa.array([r.get("caption") for r in rows], pa.string()),
        "jpg": pa.array([r.get("jpg") for r in rows], pa.binary()),
        "status": [r.get("status", "success") for r in rows],
        "error_message": pa.array([None] * len(rows), pa.string()),
        "width": [32] * len(rows), "height": [32] * len(rows),
        "original_width": [32] * len(rows), "original_height": [32] * len(rows),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_capfilt_shard(path: Path, rows: list[dict]) -> None:
    """CapFilt-output-format parquet: input columns plus the `texts` list of kept texts."""
    table = pa.table({
        "key": [r["key"] for r in rows],
        "caption": [r.get("caption", "web text") for r in rows],
        "jpg": pa.array([r["jpg"] for r in rows], pa.binary()),
        "status": ["success"] * len(rows),
        "texts": pa.array([r["texts"] for r in rows], pa.list_(pa.string())),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_input_dir(directory: Path, num_rows: int, shards: int = 2) -> Path:
    """`num_rows` good rows of coloured left-half images, each colour with its own caption."""
    rows = [{"key": f"{i:06d}", "caption": CAPTIONS[i % 8],
             "jpg": png_bytes(left_right_image(COLOURS[i % 8]))} for i in range(num_rows)]
    per = -(-num_rows // shards)
    for s in range(shards):
        write_input_shard(directory / f"{s:05d}.parquet", rows[s * per:(s + 1) * per])
    return directory


def test_decode_refuses_bad_images_and_converts_to_rgb():
    good = png_bytes(Image.new("L", (16, 12), 100))
    image = decode_image(good)
    assert image.mode == "RGB" and image.size == (16, 12)
    jpeg = png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageDecodeError, match="undecodable"):
        decode_image(jpeg[: len(jpeg) // 2])  # truncated: refused, not padded with grey
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(good, DecodeLimits(max_pixels=100))
    with pytest.raises(ImageDecodeError, match="max_bytes"):
        decode_image(good, DecodeLimits(max_bytes=10))
    with pytest.raises(ImageDecodeError, match="min_side"):
        decode_image(png_bytes(Image.new("RGB", (4, 40))))
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(None)


def test_input_rows_skipped_and_counted(tmp_path):
    good = png_bytes(left_right_image(COLOURS[0]))
    truncated = png_bytes(left_right_image(COLOURS[1]), "JPEG")[:200]
    rows = [
        {"key": "a", "caption": "first", "jpg": good},
        {"key": "b", "caption": "failed download", "jpg": None, "status": "failed_to_download"},
        {"key": "c", "caption": "no image", "jpg": None},
        {"key": "d", "caption": None, "jpg": good},
        {"key": "e", "caption": "...", "jpg": good},  # nothing left after cleaning
        {"key": "f", "caption": "truncated", "jpg": truncated},
        {"key": "g", "caption": "last one", "jpg": good},
    ]
    write_input_shard(tmp_path / "in" / "0.parquet", rows)
    dataset = ImageTextDataset([tmp_path / "in"], EvalTransform(16))
    assert dataset.skipped == {"status": 1, "no_image": 1, "no_text": 2}
    assert len(dataset) == 3 and dataset.read == len(dataset) + sum(dataset.skipped.values())
    assert dataset.formats == {str(tmp_path / "in" / "0.parquet"): "input"}
    assert dataset.texts == [["first"], ["truncated"], ["last one"]]
    # Row 1 does not decode: its slot is filled by the next row and the failure reported.
    sample = dataset[(1, 0)]
    assert sample["decode_failed"] == [1] and sample["idx"] == 2 and sample["text"] == "last one"
    assert dataset[(0, 0)]["decode_failed"] == []


def test_missing_column_named(tmp_path):
    write_input_shard(tmp_path / "in" / "0.parquet", [{"key": "a", "caption": "x", "jpg": b"1"}])
    with pytest.raises(KeyError, match="columns.image"):
        ImageTextDataset([tmp_path / "in"], EvalTransform(16), Columns(image="image"))
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        ImageTextDataset([tmp_path], EvalTransform(16))


def test_capfilt_texts_sampled_per_seed_epoch_row(tmp_path):
    jpg = png_bytes(left_right_image(COLOURS[2]))
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
    assert all(dataset[(row, 2)]["idx"] == row for row in range(len(dataset)))


def test_mixed_formats_concatenate_with_row_ids(tmp_path):
    make_input_dir(tmp_path / "human", 6, shards=1)
    jpg = png_bytes(left_right_image(COLOURS[3]))
    write_capfilt_shard(tmp_path / "web" / "0.parquet",
                        [{"key": f"w{i}", "jpg": jpg, "texts": ["a", "b"]} for i in range(4)])
    dataset = ImageTextDataset([tmp_path / "human", tmp_path / "web"], EvalTransform(16))
    assert len(dataset) == 10
    assert sorted(dataset.formats.values()) == ["capfilt", "input"]
    assert dataset[(7, 0)]["idx"] == 7 and dataset[(7, 0)]["text"] in {"a", "b"}


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
                "decode_failed": [8]}]
    batch = Collator(tokenizer, max_text_len=35, prompt="a picture of ")(samples)
    assert batch["lm_prompt_len"] == 3
    prompt_ids = tokenizer("a picture of", add_special_tokens=False).input_ids
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert batch["input_ids"][:, 1:4].tolist() == [prompt_ids, prompt_ids]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)  # longest: 10 words + CLS/SEP
    assert batch["attention_mask"][0].sum() == 8 and batch["input_ids"][0, 8] == tokenizer.pad_token_id
    assert batch["idx"].tolist() == [4, 9] and batch["decode_failed"] == [8]
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
