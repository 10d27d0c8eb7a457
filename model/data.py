"""Image-text training data for MED: parquet shards in, normalised pixels and token ids out.

Two row formats, told apart per file by their columns:
  * input shards (img2dataset parquet): one text per row from the caption column; rows whose
    status is not "success" are skipped and counted;
  * CapFilt output (`texts` list column, the kept texts): one text per row per epoch, drawn
    deterministically from (seed, epoch, row).
Sample ids (`idx`) name the image, not the row: the sha256 of the image bytes, or a column's
value (`Columns.image_id`), as BLIP's coco_karpathy datasets number `img_id`s. The captions of
one image (one row per caption in COCO-style human data, or the kept texts of a CapFilt row) are
then ITC positives of each other and never each other's ITM negatives.

Everything random about a sample (which text, crop, flip, augmentation) is a function of
(seed, epoch, row): the sampler hands out (row, epoch) keys, so a batch is the same whichever
DataLoader worker builds it and a resumed run sees exactly the batches an uninterrupted one
would. Encoded images stay in Arrow buffers, which forked DataLoader workers share
copy-on-write; the whole encoded corpus of one process therefore has to fit in memory.

Round 0 pre-trains on raw web shards, so images are decoded by the pipeline's bounded decoder
(`model.images.decode_image`, with the run's `run.image` limits and format allow-list) and bad
input is counted, never fatal: a shard without a needed column is skipped whole (its rows
counted under "schema", the reason kept in `problems`), captions that are not valid UTF-8 are
skipped ("bad_text"), and an image that fails to decode is skipped with its reason and its slot
filled by the next row, so batches keep their size (ITC gathers equal batches across ranks).
"""

from __future__ import annotations

import hashlib
import math
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

from .image_config import ImageConfig
from .image_norm import IMAGE_MEAN, IMAGE_STD
from .images import ImageError, decode_image
from .text import pre_caption
from .utf8 import utf8_text


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


# BLIP's RandomAugment(2, 5, isPIL=True, augs=[...]) (transform/randaugment.py), op for op. Levels
# are out of MAX_LEVEL 10; each op maps its level as BLIP's `*_level_to_args` does:
#   enhance (Brightness, Sharpness): factor 0.1 + 1.8 * level/10, unsigned, so BLIP's level 5
#     gives 1.0 and both are the identity there;
#   shear: 0.3 * level/10, sign drawn per use; translate: 10 * level/10 PIXELS (BLIP's
#     translate_const, whatever the image side), signed; rotate: 30 * level/10 degrees, signed;
#   geometric ops fill uncovered pixels with BLIP's replace_value (128, 128, 128);
#   AutoContrast and Equalize are PIL's (BLIP's cv2 versions reproduce them), Identity is.
# BLIP draws its 2 ops with replacement (np.random.choice) and applies each with probability 0.5.
RANDAUG_MAX_LEVEL = 10
_FILL = (128, 128, 128)
_TRANSLATE_PIXELS = 10


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _share(level: float) -> float:
    return level / RANDAUG_MAX_LEVEL


def enhance_factor(level: float) -> float:
    """BLIP's enhance_level_to_args."""
    return 0.1 + 1.8 * _share(level)


def _affine(image: Image.Image, coeffs: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_FILL)


def _shear(level: float, rng: np.random.Generator) -> float:
    return _signed(rng, 0.3 * _share(level))


def _shift(level: float, rng: np.random.Generator) -> float:
    return _signed(rng, _TRANSLATE_PIXELS * _share(level))


# name -> f(image, level, rng)
RANDAUG_OPS = {
    "identity": lambda im, level, rng: im,
    "autocontrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "brightness": lambda im, level, rng: ImageEnhance.Brightness(im).enhance(enhance_factor(level)),
    "sharpness": lambda im, level, rng: ImageEnhance.Sharpness(im).enhance(enhance_factor(level)),
    "equalize": lambda im, level, rng: ImageOps.equalize(im),
    "shear_x": lambda im, level, rng: _affine(im, (1, _shear(level, rng), 0, 0, 1, 0)),
    "shear_y": lambda im, level, rng: _affine(im, (1, 0, 0, _shear(level, rng), 1, 0)),
    "translate_x": lambda im, level, rng: _affine(im, (1, 0, _shift(level, rng), 0, 1, 0)),
    "translate_y": lambda im, level, rng: _affine(im, (1, 0, 0, 0, 1, _shift(level, rng))),
    "rotate": lambda im, level, rng: im.rotate(_signed(rng, 30 * _share(level)), Image.BILINEAR, fillcolor=_FILL),
}
RANDAUG_OP_NAMES = tuple(RANDAUG_OPS)


def randaug_draw(rng: np.random.Generator, num_ops: int) -> list[str]:
    """The ops applied to one image: `num_ops` drawn with replacement, each kept with probability 0.5."""
    return [str(name) for name in rng.choice(RANDAUG_OP_NAMES, size=num_ops) if rng.random() < 0.5]


def crop_box(width: int, height: int, scale: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (BLIP's crop): area share in `scale`, aspect ratio in
    [3/4, 4/3], ten tries, then the whole image with its aspect ratio clamped to that range."""
    area = width * height
    ratio = (3 / 4, 4 / 3)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TrainTransform:
    """BLIP's train transform: random resized crop, optional flip, RandAugment, normalise.

    Flip is off unless asked for (BLIP flips half of the images): captions that name left and
    right (as the demo world's do) become false under a mirror image.
    """

    def __init__(self, image_size: int, hflip: bool = False, randaug_ops: int = 2,
                 randaug_magnitude: int = 5, crop_scale: tuple[float, float] = (0.2, 1.0)):
        self.image_size = image_size  # output side in pixels
        self.hflip = hflip  # mirror half of the images
        self.randaug_ops = randaug_ops  # ops drawn per image (BLIP: 2)
        self.randaug_level = randaug_magnitude  # out of RANDAUG_MAX_LEVEL (BLIP: 5)
        self.crop_scale = crop_scale  # share of the image area the crop keeps (BLIP: 0.2-1 pre-training)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        box = crop_box(image.width, image.height, self.crop_scale, rng)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        for name in randaug_draw(rng, self.randaug_ops):
            image = RANDAUG_OPS[name](image, self.randaug_level, rng)
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
    image_id: str = ""  # column naming each row's image (train.image_id_column); "" = sha256 of the bytes


@dataclass(frozen=True)
class ParquetFile:
    """A parquet file on a pyarrow filesystem. Callers may pass anything with `fs` and `path`
    (capfilt's storage locations are such), so object stores need nothing here."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.path


def parquet_files(directory: str | Path) -> list[ParquetFile]:
    """Parquet shards of a local directory; a CapFilt output root resolves to its `data/` part."""
    import pyarrow.fs as pafs

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist")
    files = sorted(directory.glob("*.parquet"))
    if not files and (directory / "data").is_dir():
        files = sorted((directory / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {directory} (nor in {directory / 'data'})")
    return [ParquetFile(pafs.LocalFileSystem(), str(f)) for f in files]


def id63(data: bytes) -> int:
    """A non-negative 63-bit sample id from bytes (the first 8 bytes of their sha256): equal for
    equal bytes in every process, and never the queue's -100."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def _texts_of_file(table: pa.Table, columns: Columns, max_words: int) -> tuple[list[list[str]], np.ndarray]:
    """Cleaned texts per row, and which rows' caption is not valid UTF-8."""
    if columns.texts in table.column_names:
        raw = table.column(columns.texts).to_pylist()
        bad = np.zeros(table.num_rows, dtype=bool)
    else:
        captions, invalid = utf8_text(table.column(columns.text))  # binary columns decode per row
        raw = [[text] if text is not None else [] for text in captions.to_pylist()]
        bad = np.asarray(invalid, dtype=bool)
    cleaned = [[pre_caption(t, max_words) for t in (texts or []) if t] for texts in raw]
    return [[t for t in texts if t] for texts in cleaned], bad


class ImageTextDataset(Dataset):
    """Rows of parquet files; `dataset[(row, epoch)]` is one training sample.

    `sources` are local directories (their shards, see `parquet_files`) or files on any pyarrow
    filesystem (objects with `fs` and `path`, e.g. capfilt's object-store locations).

    `skipped` counts the rows left out while indexing, by reason: bad status, no image, caption
    not valid UTF-8, no text, or a shard that lacks a needed column ("schema"; `problems` says
    why per file). `read` is every row in the files, so read = len(self) + sum(skipped.values()).
    Images are decoded when sampled; the ones refused are reported by the samples (`decode_failed`).
    """

    def __init__(self, sources: Sequence[Any], transform: TrainTransform | EvalTransform,
                 columns: Columns = Columns(), max_words: int = 30, seed: int = 0,
                 image_cfg: ImageConfig = ImageConfig()):
        self.transform = transform
        self.columns = columns
        self.seed = seed
        self.max_words = max_words  # captions are cut to this many words
        self.image_cfg = image_cfg  # decoding limits and formats: the pipeline's `run.image`
        self.files = [f for source in sources
                      for f in (parquet_files(source) if isinstance(source, (str, Path)) else [source])]
        self.formats: dict[str, str] = {}  # file -> "capfilt" | "input"
        self.problems: dict[str, str] = {}  # file -> why all of its rows were skipped
        self.skipped = {"status": 0, "no_image": 0, "bad_text": 0, "no_text": 0, "schema": 0}
        self.read = 0
        # Per file (None for a skipped one): the encoded images and image ids, as Arrow arrays.
        self._images: list[pa.Array | None] = []
        self._image_ids: list[pa.Array | None] = []
        file_of_row, row_in_file, self.texts = [], [], []
        for file_index, path in enumerate(self.files):
            table, num_rows, problem = self._read(path)
            self.read += num_rows
            if problem is not None:
                self.skipped["schema"] += num_rows
                self.problems[str(path)] = problem
                self._images.append(None)
                self._image_ids.append(None)
                continue
            rows, texts = self._usable_rows(table)
            self._images.append(table.column(columns.image).combine_chunks())
            self._image_ids.append(table.column(columns.image_id).combine_chunks() if columns.image_id else None)
            file_of_row.append(np.full(len(rows), file_index, dtype=np.int32))
            row_in_file.append(rows.astype(np.int64))
            self.texts.extend(texts[r] for r in rows)
        self._file_of_row = np.concatenate(file_of_row) if file_of_row else np.zeros(0, np.int32)
        self._row_in_file = np.concatenate(row_in_file) if row_in_file else np.zeros(0, np.int64)
        if len(self) == 0:
            raise ValueError(f"no usable rows in {[str(s) for s in sources]} (skipped: {self.skipped}"
                             + (f"; {self.problems}" if self.problems else "") + ")")

    def _read(self, source: Any) -> tuple[pa.Table | None, int, str | None]:
        """(table of the needed columns, rows in the file, None) or (None, rows, why it is skipped)."""
        path = str(source)
        try:
            meta = pq.ParquetFile(source.path, filesystem=source.fs)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
        arrow_schema, num_rows = meta.schema_arrow, meta.metadata.num_rows
        names = arrow_schema.names
        is_capfilt = self.columns.texts in names
        self.formats[str(path)] = "capfilt" if is_capfilt else "input"
        text = (self.columns.texts, "CapFilt's texts") if is_capfilt else (self.columns.text, "run.columns.text")
        needed = [(self.columns.image, "run.columns.image"), text, (self.columns.image_id, "train.image_id_column")]
        for column, key in needed:
            if column and column not in names:
                return None, num_rows, f"column {column!r} ({key}) is missing; columns present: {names}"
        has_status = self.columns.status in names
        if has_status and not (pa.types.is_string(arrow_schema.field(self.columns.status).type)
                               or pa.types.is_large_string(arrow_schema.field(self.columns.status).type)):
            return None, num_rows, f"column {self.columns.status!r} (run.columns.status) is not a string"
        wanted = [column for column, _ in needed if column] + [self.columns.status] * has_status
        return pq.read_table(source.path, columns=wanted, filesystem=source.fs), num_rows, None

    def _usable_rows(self, table: pa.Table) -> tuple[np.ndarray, list[list[str]]]:
        """Row numbers that can be trained on, counting the others in `skipped`; texts per row."""
        texts, bad_text = _texts_of_file(table, self.columns, self.max_words)
        ok = np.ones(table.num_rows, dtype=bool)
        if self.columns.status in table.column_names:
            # A null status is "not reported" (as in the pipeline): the image bytes decide.
            status_ok = np.asarray(pc.equal(table.column(self.columns.status), self.columns.success)
                                   .fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
            self.skipped["status"] += int((~status_ok).sum())
            ok &= status_ok
        has_image = np.asarray(table.column(self.columns.image).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        for reason, good in (("no_image", has_image), ("bad_text", ~bad_text),
                             ("no_text", np.array([bool(t) for t in texts], dtype=bool))):
            self.skipped[reason] += int((ok & ~good).sum())
            ok &= good
        return np.flatnonzero(ok), texts

    def __len__(self) -> int:
        return len(self.texts)

    def sample_rng(self, row: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, row])

    def _image_bytes(self, row: int) -> bytes | None:
        return self._images[self._file_of_row[row]][int(self._row_in_file[row])].as_py()

    def image_id(self, row: int, data: bytes | None) -> int:
        """The row's sample id: its `image_id` column value's id63, or its image bytes' (null ids too)."""
        ids = self._image_ids[self._file_of_row[row]]
        value = ids[int(self._row_in_file[row])].as_py() if ids is not None else None
        if value is not None:
            return id63(f"image_id:{value}".encode())
        return id63(data or b"")

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """key = (row, epoch), or a bare row for epoch 0. Returns image, text, idx and
        decode_failed: (row, ImageError.reason) of each image refused before this one."""
        row, epoch = key if isinstance(key, tuple) else (key, 0)
        failed = []
        for attempt in range(len(self)):
            candidate = (row + attempt) % len(self)
            rng = self.sample_rng(candidate, epoch)
            texts = self.texts[candidate]
            text = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
            data = self._image_bytes(candidate)
            try:
                pixels = self.transform(decode_image(data, self.image_cfg), rng)
            except ImageError as err:
                failed.append((candidate, err.reason))
                continue
            return {"image": pixels, "text": text, "idx": self.image_id(candidate, data), "decode_failed": failed}
        raise ValueError(f"none of the {len(self)} images decodes (refused: {sorted({r for _, r in failed})})")


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
            "decode_failed": [failure for s in samples for failure in s["decode_failed"]],  # (row, reason)
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
