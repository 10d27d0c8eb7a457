"""JPEG decoding on the device (`run.resources.decode_on_device`): which images go there, the resize
against PIL's, and (`gpu`) the whole path against the CPU decoder."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from capfilt.images import DecodedImages, resize_uint8
from capfilt.model.device_decode import resize_on_device, takes
from capfilt.model.images import decode_image, open_image


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_only_whole_rgb_or_grey_jpegs_go_to_the_device():
    rgb = jpeg(photo(0))
    grey = jpeg(photo(1).convert("L"))
    cmyk = jpeg(photo(2).convert("CMYK"))
    png = io.BytesIO()
    photo(3).save(png, "PNG")
    cases = {"rgb": (rgb, True), "grey": (grey, True), "cmyk": (cmyk, False), "png": (png.getvalue(), False),
             "truncated": (rgb[: len(rgb) // 2], False)}
    for name, (data, expected) in cases.items():
        assert takes(open_image(data), data) is expected, name


@pytest.mark.parametrize("side", [32, 64, 96])
def test_the_device_resize_is_pils_bicubic_within_one_level(side):
    """torch's antialiased bicubic vs PIL's, on the CPU: what the device path changes in the pixels."""
    for seed in range(3):
        image = decode_image(jpeg(photo(seed)))
        want = resize_uint8(image, side).astype(int)
        got = resize_on_device(torch.from_numpy(np.array(image)).permute(2, 0, 1), side).numpy().astype(int)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1


@pytest.mark.gpu
def test_the_device_decoder_against_the_cpu_decoder(blip_dirs):
    """Pixels within a few levels of the CPU decoder's, the same rows refused with the same reasons,
    and BLIP ITM scores within a small margin; the difference is printed for the record."""
    from capfilt.config import CaptionConfig, FilterConfig, ResourcesConfig, RunConfig
    from capfilt.stages.fused import CaptionAndFilter
    from tests.bad_input import IMAGE_CONFIG, image_cases

    cuda = torch.device("cuda")
    hostile = [data for data, _ in image_cases().values()]
    photos = [jpeg(photo(seed, (640, 480))) for seed in range(8)]
    data = photos[:4] + hostile + photos[4:]
    rows = list(range(len(data)))
    host = DecodedImages.decode(data, rows, IMAGE_CONFIG, {32, 64})
    device = DecodedImages.decode(data, rows, IMAGE_CONFIG, {32, 64}, cuda)
    assert device.rows == host.rows and device.errors == host.errors
    for side in (32, 64):
        diff = np.abs(device.uint8(device.rows, side).astype(int) - host.uint8(host.rows, side).astype(int))
        print(f"side {side}: pixel difference mean {diff.mean():.3f} max {diff.max()} (0-255)")
        assert diff.mean() < 1.0 and diff.max() <= 16

    run = RunConfig(image=IMAGE_CONFIG, caption=CaptionConfig(model=str(blip_dirs["captioner"]), max_length=6),
                    filter=FilterConfig(model=str(blip_dirs["filter"])))
    table = pa.table({"key": [f"k{i}" for i in rows], "jpg": pa.array(data, pa.binary()),
                      "caption": ["a photo"] * len(data), "error": pa.array([None] * len(data), pa.string())})
    on_host = CaptionAndFilter(run)(table)
    on_device = CaptionAndFilter(dataclasses.replace(
        run, resources=ResourcesConfig(decode_on_device=True)))(table)
    assert on_device["_decode_error"].to_pylist() == on_host["_decode_error"].to_pylist()
    scored = [i for i, v in enumerate(on_host["caption_itm"].to_pylist()) if v is not None]
    delta = np.abs(np.asarray(on_device["caption_itm"].to_pylist(), dtype=float)[scored]
                   - np.asarray(on_host["caption_itm"].to_pylist(), dtype=float)[scored])
    print(f"ITM P(match) difference: mean {delta.mean():.2e} max {delta.max():.2e} over {len(scored)} images")
    assert delta.max() < 0.05
