"""Bounded decoding: bombs, truncation, junk, formats, and mode conversion to 8-bit RGB."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfilt.config import ImageConfig
from capfilt.images import (CLIP_MEAN, ImageError, ImageSpec, decode_image, load_image_spec, pixel_values,
                            resize_uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_rgb_jpeg_decodes():
    img = decode_image(encode(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG"))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_bomb_is_refused_from_the_header_before_decoding(monkeypatch):
    data = encode(Image.new("1", (3000, 3000)), "PNG")  # a few KB encoded, 9 Mpx decoded
    assert len(data) < 100_000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"3000x3000 pixels is over run.image.max_pixels=1000000"):
        decode_image(data, ImageConfig(max_pixels=1_000_000))


def test_oversized_encoding_is_refused():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageError, match="run.image.max_bytes=100"):
        decode_image(data, ImageConfig(max_bytes=100))


def test_truncated_jpeg_is_refused():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", None, bytes(range(256)) * 4, b"GIF89a garbage"])
def test_junk_bytes_are_refused(data):
    with pytest.raises(ImageError):
        decode_image(data)


def test_formats_outside_the_allow_list_are_refused():
    data = encode(Image.new("RGB", (16, 16)), "PCX")
    assert Image.open(io.BytesIO(data)).format == "PCX"  # PIL itself would read it
    with pytest.raises(ImageError, match="allowed format"):
        decode_image(data)


def test_tiny_images_are_refused():
    with pytest.raises(ImageError, match="min_side"):
        decode_image(encode(Image.new("RGB", (4, 40)), "PNG"))


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)


def test_palette_with_transparency():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    data = encode(img, "PNG", transparency=0)
    out = np.asarray(decode_image(data))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[8, 8]) == (10, 200, 30)


def test_cmyk_jpeg_to_rgb():
    out = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = np.asarray(out)[8, 8]
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60  # red


def test_16_bit_greyscale_is_scaled_not_clipped():
    array = np.full((16, 16), 32768, dtype=np.uint16)
    array[0, 0] = 65535
    out = np.asarray(decode_image(encode(Image.fromarray(array), "PNG")))
    assert tuple(out[8, 8]) == (128, 128, 128) and tuple(out[0, 0]) == (255, 255, 255)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, _ = np.asarray(decode_image(buf.getvalue()))[8, 8]
    assert r > 200 and g < 50


def test_preprocessing_matches_transformers_blip_processor():
    from transformers import BlipImageProcessorPil

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    spec = ImageSpec(size=32)
    ours = pixel_values(resize_uint8(img, 32)[None], spec)
    stock = BlipImageProcessorPil(size={"height": 32, "width": 32})(img, return_tensors="pt")["pixel_values"]
    assert ours.shape == stock.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(ours.numpy(), stock.numpy(), atol=1e-5)


def test_image_spec_from_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2]}))
    assert load_image_spec(tmp_path) == ImageSpec(384, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 224}}))
    assert load_image_spec(tmp_path) == ImageSpec(224, CLIP_MEAN)
