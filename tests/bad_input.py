"""The bad-input corpus: web rows and shards capfilt must survive, each with the outcome it must get.

Not a test module. tests/capfilt/test_images.py decodes the image cases directly;
tests/pipelines/test_bad_input.py writes everything as input shards and runs `capfilt run` once;
tests/capfilt/test_training.py pre-trains on the same shards (`capfilt pretrain`).
An expected outcome is PROCESSED (the row is scored and lands in data/ or rejected/) or a
substring of the row's `error` in failed/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

from capfilt.config import ImageConfig
from tests.tiny_blip import INPUT_SCHEMA, encode, image_bytes
from tests.tiny_blip import row as input_row

PROCESSED = None  # expected outcome: scored, in data/ or rejected/

# Limits the corpus is built against (the pipeline test passes them as --set).
MAX_PIXELS = 250_000
MAX_BYTES = 2_000_000
IMAGE_CONFIG = ImageConfig(max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
IMAGE_SETTINGS = [f"run.image.max_pixels={MAX_PIXELS}", f"run.image.max_bytes={MAX_BYTES}"]
BOMB_SIDE = 8_000  # the PNG bomb's side: 64 Mpx (under PIL's own 89 Mpx check), 192 MB as RGB, 8 KB encoded


def noise(side: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (side, side, channels) if channels > 1 else (side, side)
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A 1-bit all-black PNG: kilobytes on disk, `side`^2 pixels once decoded."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def png_text_bomb(megabytes: int = 16) -> bytes:
    """A small valid PNG whose zTXt chunk inflates to `megabytes` MB (PIL stops at 1 MB)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "\0" * (megabytes << 20), zip=True)
    return encode(Image.fromarray(noise(16, 5)), "PNG", pnginfo=info)


def gif_bomb(side: int = 60_000) -> bytes:
    """A 35-byte GIF claiming `side` x `side` pixels (3.6 Gpx: PIL's own bomb check refuses it)."""
    header = b"GIF89a" + side.to_bytes(2, "little") * 2 + b"\x80\x00\x00" + b"\x00" * 6  # 2-colour table
    frame = b"\x2c" + b"\x00" * 4 + side.to_bytes(2, "little") * 2 + b"\x00"
    data = b"\x02\x02\x44\x01\x00"  # LZW: min code size 2, one tiny sub-block
    return header + frame + data + b"\x3b"


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_png() -> bytes:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    return encode(img, "PNG", transparency=0)


def image_cases() -> dict[str, tuple[bytes, str | None]]:
    """name -> (encoded bytes, expected outcome) for one image each."""
    jpeg = encode(Image.fromarray(noise(64, 1)), "JPEG")
    rgba = np.concatenate([noise(32, 2), noise(32, 3, channels=1)[..., None]], axis=-1)
    grey16 = (noise(32, 4, channels=1).astype(np.uint16) * 257)
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
    return {
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "decode: truncated image"),
        "zero_bytes": (b"", "decode: no image bytes"),
        "random_bytes": (np.random.default_rng(6).bytes(4096), "decode: not an image in an allowed format"),
        "html_as_jpg": (html, "decode: not an image in an allowed format"),
        "pcx_not_allowed": (encode(Image.new("RGB", (16, 16)), "PCX"), "decode: not an image in an allowed format"),
        # PIL would hand an EPS file to Ghostscript: it must never reach PIL's EPS plugin.
        "eps_not_allowed": (encode(Image.new("RGB", (16, 16), (10, 20, 30)), "EPS"),
                            "decode: not an image in an allowed format"),
        "too_small": (encode(Image.new("RGB", (4, 40)), "PNG"), "decode: 4x40 is under run.image.min_side=8"),
        "png_bomb": (png_bomb(), f"decode: {BOMB_SIDE}x{BOMB_SIDE} pixels is over run.image.max_pixels={MAX_PIXELS}"),
        "gif_bomb": (gif_bomb(), "decode: decompression bomb (Image size (3600000000 pixels) exceeds limit"),
        "png_text_bomb": (png_text_bomb(), "decode: corrupt image (ValueError: Decompressed data too large"),
        "over_pixel_limit": (encode(Image.fromarray(noise(600, 7)), "JPEG", quality=50),
                             f"decode: 600x600 pixels is over run.image.max_pixels={MAX_PIXELS}"),
        "over_byte_limit": (b"\xff\xd8\xff\xe0" + bytes(MAX_BYTES),
                            f"decode: encoded size {MAX_BYTES + 4} bytes is over run.image.max_bytes={MAX_BYTES}"),
        "cmyk_jpeg": (encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), PROCESSED),
        "png_16bit": (encode(Image.fromarray(grey16), "PNG"), PROCESSED),
        "rgba_png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), PROCESSED),
        "palette_png": (palette_png(), PROCESSED),
        "animated_gif": (animated_gif(), PROCESSED),
        "webp": (encode(Image.fromarray(noise(32, 8)), "WEBP"), PROCESSED),
    }


MEGABYTE_CAPTION = ("a photo of a thing on a table " * 40_000)[: 1 << 20]
BAD_UTF8 = b"a photo of \xff\xfe broken bytes"


def caption_cases() -> dict[str, tuple[str | None, str | None]]:
    """name -> (caption, expected outcome), each with a good image."""
    return {
        "caption_null": (None, PROCESSED),
        "caption_empty": ("", PROCESSED),
        "caption_blank": (" \t\n ", PROCESSED),
        "caption_1mb": (MEGABYTE_CAPTION, PROCESSED),
        "caption_unicode": ("un café ☕ à Tōkyō 東京", PROCESSED),
    }


def row(key: str | None, image: bytes | None, caption=b"", seed: int = 0, status: str | None = None) -> dict:
    """An img2dataset row; caption b"" (the default) means a normal caption."""
    return input_row(key, f"a photo of thing {seed}" if caption == b"" else caption, image, status)


def string_array_unchecked(values: list[bytes]) -> pa.Array:
    """A string array holding raw bytes as they are (pyarrow would refuse invalid UTF-8 from Python),
    as a non-validating parquet writer produces it."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def write_corpus(root: Path) -> dict[str | int | None, str | None]:
    """Write every case as input shards under `root`; returns key -> expected outcome.

    Row keys are unique across shards (int in the int64-key shard); the null-key row is under None.
    Shard names sort in this order, so `10_width_string` meets an int64 `width` first.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str | int | None, str | None] = {}

    def table(rows: list[dict], schema: pa.Schema = INPUT_SCHEMA) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=schema)

    def good(prefix: str, n: int, seed: int) -> list[dict]:
        rows = [row(f"{prefix}{i}", image_bytes(seed + i), seed=seed + i) for i in range(n)]
        expected.update({r["key"]: PROCESSED for r in rows})
        return rows

    # 00: one row per image case, plus a failed download and a null key.
    rows = good("img_good", 2, 100)
    for i, (name, (data, outcome)) in enumerate(image_cases().items()):
        rows.append(row(f"img_{name}", data, seed=i))
        expected[f"img_{name}"] = outcome
    rows.append(row("img_failed_download", None, status="failed_to_download"))
    expected["img_failed_download"] = "download: timed out"
    rows.append(row(None, image_bytes(1), seed=1))
    expected[None] = "input: key is null"
    pq.write_table(table(rows), root / "00_images.parquet")

    # 01: caption cases (string column).
    rows = good("cap_good", 1, 200)
    for i, (name, (caption, outcome)) in enumerate(caption_cases().items()):
        rows.append(row(f"cap_{name}", image_bytes(210 + i), caption=caption))
        expected[f"cap_{name}"] = outcome
    pq.write_table(table(rows), root / "01_captions.parquet")

    # 02: a binary caption column: decoded as UTF-8 per row; invalid bytes fail the row.
    binary_schema = INPUT_SCHEMA.set(INPUT_SCHEMA.get_field_index("caption"), pa.field("caption", pa.binary()))
    rows = [row("bin_ok", image_bytes(300), caption="un café ☕".encode()),
            row("bin_null", image_bytes(301), caption=None),
            row("bin_invalid", image_bytes(302), caption=BAD_UTF8)]
    expected.update(bin_ok=PROCESSED, bin_null=PROCESSED, bin_invalid="input: caption is not valid UTF-8")
    pq.write_table(table(rows, binary_schema), root / "02_caption_binary.parquet")

    # 03: a string caption column holding invalid UTF-8 (parquet readers do not check).
    rows = [row("str_ok", image_bytes(310)), row("str_invalid", image_bytes(311))]
    captions = string_array_unchecked([b"a photo of thing 310", BAD_UTF8])
    bad = table(rows).set_column(INPUT_SCHEMA.get_field_index("caption"), "caption", captions)
    expected.update(str_ok=PROCESSED, str_invalid="input: caption is not valid UTF-8")
    pq.write_table(bad, root / "03_caption_bad_utf8.parquet")

    # 04: an extra column (null in the other shards' outputs).
    extra = table(good("extra", 2, 400)).append_column("aesthetic", pa.array([5.5, 6.25], pa.float64()))
    pq.write_table(extra, root / "04_extra_column.parquet")

    # 05: no status / error_message columns: rows count as downloaded.
    pq.write_table(table(good("nostatus", 2, 500)).drop_columns(["status", "error_message"]),
                   root / "05_no_status.parquet")

    # 06, 07: safe type changes (string -> large_string, binary -> large_binary) are read as one type.
    for name, column, arrow_type, seed in (("06_text_large_string", "caption", pa.large_string(), 600),
                                           ("07_image_large_binary", "jpg", pa.large_binary(), 700)):
        schema = INPUT_SCHEMA.set(INPUT_SCHEMA.get_field_index(column), pa.field(column, arrow_type))
        pq.write_table(table(good(name[3:], 2, seed), schema), root / f"{name}.parquet")

    # 08-10: shards that fail as a whole, each row with the shard's reason.
    def whole(prefix: str, n: int, reason: str) -> list[dict]:
        rows = [row(f"{prefix}{i}", image_bytes(800 + i)) for i in range(n)]
        expected.update({r["key"]: reason for r in rows})
        return rows

    rows = whole("noimage", 2, "schema: column 'jpg' (run.columns.image) is missing")
    pq.write_table(table(rows).drop_columns(["jpg"]), root / "08_missing_image_column.parquet")
    rows = [row(str(90 + i), image_bytes(810 + i)) for i in range(2)]
    int_keys = table(rows).set_column(0, "key", pa.array([90, 91], pa.int64()))
    expected.update({90: "schema: column 'key' (run.columns.key) has type int64",
                     91: "schema: column 'key' (run.columns.key) has type int64"})
    pq.write_table(int_keys, root / "09_key_int64.parquet")
    rows = whole("widthstr", 2, "schema: conflicts with the other shards (Unable to merge: Field width "
                                "has incompatible types: int64 vs string")
    width_schema = INPUT_SCHEMA.set(INPUT_SCHEMA.get_field_index("width"), pa.field("width", pa.string()))
    pq.write_table(table([{**r, "width": "48"} for r in rows], width_schema), root / "10_width_string.parquet")

    # 11: an empty shard.
    pq.write_table(table([]), root / "11_empty.parquet")
    return expected
