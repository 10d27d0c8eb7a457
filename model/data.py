"""Image-text training data for MED: parquet shards in, normalised pixels and token ids out.

Two row formats, told apart per file by their columns:
  * input shards (img2dataset parquet): one text per row from the caption column; rows whose
    status is not "success" are skipped and counted;
  * CapFilt output (`texts` list column, the kept texts): one text per row per epoch, drawn
    deterministically from (seed, epoch, row).
Sample ids (`idx`) are row positions in the concatenated dataset, so the texts of one image
share an idx (ITC treats them as positives of each other).

Everything random about a sample (which text, crop, flip, augmentation) is a function of
(seed, epoch, row): the sampler hands out (row, epoch) keys, so a batch is the same whichever
DataLoader worker builds it and a resumed run sees exactly the batches an uninterrupted one
would. Encoded images stay in Arrow buffers, which forked DataLoader workers share
copy-on-write; the whole encoded corpus of one process therefore has to fit in memory.

An image that fails to decode (truncated, too large, not an image) is skipped, counted, and its
slot filled by the next row, so batches keep their size (ITC gathers equal batches across
ranks) and the failure is reported with the run's metrics.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset, Sampler

from .image_norm import IMAGE_MEAN, IMAGE_STD
from .text import pre_caption


# ---------------------------------------------------------------------------------------------
# Decoding


class ImageDecodeError(ValueError):
    """An image that must not or cannot be decoded; the message says why."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000  # width*height above this is refused before decoding (bombs)
    max_bytes: int = 20_000_000  # encoded size above this is refused
    min_side: int = 8  # smaller images carry nothing a ViT patch grid can use


def decode_image(data: bytes | None, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode to RGB, refusing oversized, tiny and truncated images (PIL's LOAD_TRUNCATED_IMAGES stays off)."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{len(data)} encoded bytes > max_bytes {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageDecodeError(f"{width}x{height} pixels > max_pixels {limits.max_pixels}")
        if min(width, height) < limits.min_side:
            raise ImageDecodeError(f"{width}x{height} is below min_side {limits.min_side}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notes on convert
            image.load()  # a truncated file raises here
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"undecodable image: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Transforms


def normalise(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 normalised with BLIP's mean/std."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    array = (array - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, H, W]


class EvalTransform:
    """Plain bicubic resize to a square image_size, as BLIP's test transform."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return normalise(image.resize((self.image_size, self.image_size), Image.BICUBIC))


_FILL = (128, 128, 128)  # BLIP's fill for pixels uncovered by geometric ops


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, coeffs: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_FILL)


# RandAugment ops: f(image, magnitude in [0, 1], rng). Magnitudes follow BLIP's RandomAugment:
# shear 0.3, rotate 30 degrees, enhancement +-0.9 at full strength; translate 10% of the side.
_RANDAUG_OPS = {
    "identity": lambda im, m, rng: im,
    "autocontrast": lambda im, m, rng: ImageOps.autocontrast(im),
    "equalize": lambda im, m, rng: ImageOps.equalize(im),
    "brightness": lambda im, m, rng: ImageEnhance.Brightness(im).enhance(1 + _signed(rng, 0.9 * m)),
    "sharpness": lambda im, m, rng: ImageEnhance.Sharpness(im).enhance(1 + _signed(rng, 0.9 * m)),
    "shear_x": lambda im, m, rng: _affine(im, (1, _signed(rng, 0.3 * m), 0, 0, 1, 0)),
    "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(rng, 0.3 * m), 1, 0)),
    "translate_x": lambda im, m, rng: _affine(im, (1, 0, _signed(rng, 0.1 * m * im.width), 0, 1, 0)),
    "translate_y": lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _signed(rng, 0.1 * m * im.height))),
    "rotate": lambda im, m, rng: im.rotate(_signed(rng, 30 * m), Image.BILINEAR, fillcolor=_FILL),
}
RANDAUG_OP_NAMES = tuple(_RANDAUG_OPS)


class TrainTransform:
    """BLIP's train transform: random resized crop, optional flip, RandAugment, normalise.

    Flip is off unless asked for: captions that name left and right (as the demo world's do)
    become false under a mirror image.
    """

    def __init__(self, image_size: int, hflip: bool = False, randaug_ops: int = 2,
                 randaug_magnitude: int = 5, crop_scale: tuple[float, float] = (0.5, 1.0)):
        self.image_size = image_size  # output side in pixels
        self.hflip = hflip  # mirror half of the images
        self.randaug_ops = randaug_ops  # ops drawn per image (BLIP: 2)
        self.magnitude = randaug_magnitude / 10  # BLIP's level 5 of 10
        self.crop_scale = crop_scale  # share of the image area the crop keeps (BLIP: 0.5-1.0)

    def _crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: area share in crop_scale, aspect ratio in [3/4, 4/3]."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to the central square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        box = self._crop_box(image.width, image.height, rng)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        for name in rng.choice(RANDAUG_OP_NAMES, size=self.randaug_ops, replace=False):
            if rng.random() < 0.5:  # BLIP applies each drawn op with probability 0.5
                image = _RANDAUG_OPS[name](image, self.magnitude, rng)
        return normalise(image)


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class Columns:
    image: str = "jpg"  # encoded image bytes
    text: str = "caption"  # input shards: the row's one caption
    texts: str = "texts"  # CapFilt output: list of kept texts (its presence marks the format)
    status: str = "status"  # download status; rows not equal to `success` are skipped
    success: str = "success"  # the status value of a usable row


def parquet_files(directory: str | Path) -> list[Path]:
    """Parquet shards of a directory; a CapFilt output root resolves to its `data/` part."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist")
    files = sorted(directory.glob("*.parquet"))
    if not files and (directory / "data").is_dir():
        files = sorted((directory / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {directory} (nor in {directory / 'data'})")
    return files


def _texts_of_file(table: pa.Table, columns: Columns, max_words: int) -> list[list[str]]:
    if columns.texts in table.column_names:
        raw = table.column(columns.texts).to_pylist()
    else:
        raw = [[text] if text is not None else [] for text in table.column(columns.text).to_pylist()]
    cleaned = [[pre_caption(t, max_words) for t in (texts or []) if t] for texts in raw]
    return [[t for t in texts if t] for texts in cleaned]


class ImageTextDataset(Dataset):
    """Rows of one or more parquet directories; `dataset[(row, epoch)]` is one training sample.

    `skipped` counts the rows left out while indexing (bad status, no image, no text);
    `read` is every row in the files, so read = len(self) + sum(skipped.values()).
    """

    def __init__(self, directories: Sequence[str | Path], transform: TrainTransform | EvalTransform,
                 columns: Columns = Columns(), max_words: int = 30, seed: int = 0,
                 limits: DecodeLimits = DecodeLimits()):
        self.transform = transform
        self.columns = columns
        self.seed = seed
        self.limits = limits
        self.files: list[Path] = [f for d in directories for f in parquet_files(d)]
        self.formats: dict[str, str] = {}  # file -> "capfilt" | "input"
        self.skipped = {"status": 0, "no_image": 0, "no_text": 0}
        self.read = 0
        self._images: list[pa.BinaryArray] = []  # per file, the encoded images (Arrow buffers)
        file_of_row, row_in_file, self.texts = [], [], []
        for file_index, path in enumerate(self.files):
            table = self._read(path)
            self.read += table.num_rows
            texts = _texts_of_file(table, columns, max_words)
            images = table.column(columns.image).combine_chunks()
            ok = np.ones(table.num_rows, dtype=bool)
            if columns.status in table.column_names:
                status_ok = np.asarray(pc.equal(table.column(columns.status), columns.success)
                                       .fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
                self.skipped["status"] += int((~status_ok).sum())
                ok &= status_ok
            has_image = np.asarray(images.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            self.skipped["no_image"] += int((ok & ~has_image).sum())
            ok &= has_image
            has_text = np.array([bool(t) for t in texts], dtype=bool)
            self.skipped["no_text"] += int((ok & ~has_text).sum())
            ok &= has_text
            rows = np.flatnonzero(ok)
            self._images.append(images)
            file_of_row.append(np.full(len(rows), file_index, dtype=np.int32))
            row_in_file.append(rows.astype(np.int64))
            self.texts.extend(texts[r] for r in rows)
        self._file_of_row = np.concatenate(file_of_row) if file_of_row else np.zeros(0, np.int32)
        self._row_in_file = np.concatenate(row_in_file) if row_in_file else np.zeros(0, np.int64)
        if len(self) == 0:
            raise ValueError(f"no usable rows in {[str(d) for d in directories]} (skipped: {self.skipped})")

    def _read(self, path: Path) -> pa.Table:
        names = pq.ParquetFile(path).schema_arrow.names
        is_capfilt = self.columns.texts in names
        self.formats[str(path)] = "capfilt" if is_capfilt else "input"
        text_column = self.columns.texts if is_capfilt else self.columns.text
        for key, column in (("image", self.columns.image), ("text", text_column)):
            if column not in names:
                raise KeyError(f"{path}: column {column!r} (columns.{key}) is missing; columns present: {names}")
        wanted = [self.columns.image, text_column] + [self.columns.status] * (self.columns.status in names)
        return pq.read_table(path, columns=wanted)

    def __len__(self) -> int:
        return len(self.texts)

    def sample_rng(self, row: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, row])

    def _pixels(self, row: int, rng: np.random.Generator) -> torch.Tensor:
        data = self._images[self._file_of_row[row]][int(self._row_in_file[row])].as_py()
        return self.transform(decode_image(data, self.limits), rng)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """key = (row, epoch), or a bare row for epoch 0. Returns image, text, idx, decode_failed."""
        row, epoch = key if isinstance(key, tuple) else (key, 0)
        failed = []
        for attempt in range(len(self)):
            candidate = (row + attempt) % len(self)
            rng = self.sample_rng(candidate, epoch)
            texts = self.texts[candidate]
            text = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
            try:
                pixels = self._pixels(candidate, rng)
            except ImageDecodeError:
                failed.append(candidate)
                continue
            return {"image": pixels, "text": text, "idx": candidate, "decode_failed": failed}
        raise ImageDecodeError(f"none of the {len(self)} images decodes")


class Collator:
    """Stacks images and tokenises texts ([CLS] first, padded to the longest, max_text_len).

    With a prompt (captioner fine-tuning) every text starts with it and `lm_prompt_len` says
    how many tokens after the first one are prompt, so the LM loss can skip them.
    """

    def __init__(self, tokenizer, max_text_len: int = 35, prompt: str = ""):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.prompt = prompt
        self.prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt else 0

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = self.tokenizer([self.prompt + s["text"] for s in samples], padding="longest",
                                truncation=True, max_length=self.max_text_len, return_tensors="pt")
        return {
            "pixel_values": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
            "input_ids": tokens.input_ids,  # [B, T]
            "attention_mask": tokens.attention_mask,  # [B, T]
            "idx": torch.tensor([s["idx"] for s in samples], dtype=torch.long),  # [B]
            "lm_prompt_len": self.prompt_len,
            "decode_failed": [row for s in samples for row in s["decode_failed"]],
        }


# ---------------------------------------------------------------------------------------------
# Sampling


def batches_per_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank gets per epoch (the ragged tail is dropped: ranks must agree)."""
    return num_rows // (batch_size * world_size)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """One rank's batches of (row, epoch) keys: a permutation seeded by (seed, epoch), split
    across ranks, skipping the first `start_batch` batches (resume) and stopping after
    `num_batches` (default: all full batches)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, num_batches: int | None = None):
        self.num_rows, self.batch_size, self.seed, self.epoch = num_rows, batch_size, seed, epoch
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        full = batches_per_epoch(num_rows, batch_size, world_size)
        self.num_batches = full if num_batches is None else min(num_batches, full)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        mine = order[self.rank::self.world_size]
        for b in range(self.start_batch, self.num_batches):
            rows = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(int(r), self.epoch) for r in rows]
