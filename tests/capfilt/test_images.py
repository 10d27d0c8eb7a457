"""Bounded decoding: bombs, truncation, junk, formats, and mode conversion to 8-bit RGB."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfilt.config import ImageConfig
from capfilt.images import (IMAGE_MEAN, ImageError, ImageSpec, decode_image, load_image_spec, pixel_values,
                            resize_uint8)
from tests.bad_input import IMAGE_CONFIG, PROCESSED, gif_bomb, image_cases, png_bomb, png_text_bomb
from tests.tiny_blip import encode


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
    r, g, _ = np.asarray(decode_image(encode(frames[0], "GIF", save_all=True, append_images=frames[1:])))[8, 8]
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
    assert load_image_spec(tmp_path) == ImageSpec(224, IMAGE_MEAN)


@pytest.mark.parametrize("name", sorted(image_cases()))
def test_bad_input_corpus_images(name):
    """Each image of the shared bad-input corpus decodes, or is refused with its specific reason."""
    data, outcome = image_cases()[name]
    if outcome is PROCESSED:
        img = decode_image(data, IMAGE_CONFIG)
        assert img.mode == "RGB" and min(img.size) >= IMAGE_CONFIG.min_side
    else:
        with pytest.raises(ImageError) as err:
            decode_image(data, IMAGE_CONFIG)
        assert outcome.removeprefix("decode: ") in str(err.value)


# Decodes the bombs in a fresh process and prints how far its peak RSS rose (KiB).
_RSS_PROBE = """
import resource, sys
from pathlib import Path
from capfilt.images import ImageError, decode_image
blobs = [p.read_bytes() for p in sorted(Path(sys.argv[1]).iterdir())]
decode_image(Path(sys.argv[2]).read_bytes())  # warm up the decoders and their imports
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for blob in blobs:
    try:
        decode_image(blob)
        raise SystemExit("a bomb was decoded")
    except ImageError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_bombs_are_refused_in_bounded_memory(tmp_path):
    """Default limits: the bombs (192 MB to 10 GB decoded, or a 16 MB text chunk) raise the
    decoding process's peak memory by a few MB at most."""
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    for name, data in (("png", png_bomb()), ("gif", gif_bomb()), ("png_text", png_text_bomb())):
        (bombs / name).write_bytes(data)
    (tmp_path / "ok.png").write_bytes(encode(Image.new("RGB", (64, 64)), "PNG"))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(bombs), str(tmp_path / "ok.png")],
                         capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert int(out.stdout.strip()) < 20 * 1024, out.stdout  # KiB; the smallest bomb is 192 MB as RGB


@pytest.mark.gpu
def test_pixel_values_on_cuda_equal_cpu_from_a_read_only_view():
    """The pinned, non-blocking upload gives the CPU path's values (read-only input, as pixel_rows gives)."""
    import torch

    from capfilt.images import ImageSpec, pixel_values

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    images.flags.writeable = False
    spec = ImageSpec(8)
    torch.testing.assert_close(pixel_values(images, spec, "cuda").cpu(), pixel_values(images, spec, "cpu"))


def test_pixel_values_are_the_plain_formula_bit_for_bit():
    """Normalised in place on W x 3 rows: the same bits as `(x / 255 - mean) / std`, channels-last strides."""
    import torch

    from capfilt.images import ImageSpec, pixel_values

    images = np.random.default_rng(3).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    spec = ImageSpec(24, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    plain = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    got = pixel_values(images, spec)
    assert torch.equal(got, plain) and got.stride() == plain.stride()
    read_only = images.copy()
    read_only.flags.writeable = False
    assert torch.equal(pixel_values(read_only, spec), plain)  # only read
    assert pixel_values(images, spec, dtype=torch.bfloat16).dtype == torch.bfloat16
