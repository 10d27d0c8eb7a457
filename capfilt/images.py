"""BLIP preprocessing (resize, normalise) for the pipeline, evaluation and dedup.

Decoding is `capfilt.model.images.decode_image`, the one bounded decoder of untrusted bytes that
training uses too (allow-listed formats, pixel and byte limits from `run.image`, no truncated
images, 8-bit RGB out); it and `ImageError` are imported here for this module's callers.

Preprocessing follows transformers' `BlipImageProcessor`: bicubic resize to the model's square
size, rescale to [0, 1], normalise with the CLIP mean/std read from the model's
`preprocessor_config.json`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from capfilt.model.image_config import ImageConfig
from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD
from capfilt.model.images import ImageError, decode_image

if TYPE_CHECKING:  # torch loads only where pixels become tensors (not in CPU tasks)
    import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "DecodedImages", "ImageError", "ImageSpec", "decode_image", "load_image_spec",
           "pixel_values", "resize_uint8"]


@dataclass(frozen=True)
class ImageSpec:
    size: int  # square side the model takes, in pixels
    mean: tuple[float, float, float] = IMAGE_MEAN  # per-channel normalisation mean
    std: tuple[float, float, float] = IMAGE_STD  # per-channel normalisation std


def load_image_spec(model_dir: str | Path) -> ImageSpec:
    """The preprocessing a transformers BLIP directory expects (preprocessor_config.json first)."""
    model_dir = Path(model_dir)
    pre = model_dir / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        size = data.get("size")
        side = (size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else size
        if side:
            return ImageSpec(int(side), tuple(data.get("image_mean", IMAGE_MEAN)),
                             tuple(data.get("image_std", IMAGE_STD)))
    config = json.loads((model_dir / "config.json").read_text())
    return ImageSpec(int(config["vision_config"]["image_size"]))


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to the model's square input, as BlipImageProcessor does. -> uint8 [size, size, 3]"""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def pixel_values(images: "np.ndarray | torch.Tensor", spec: ImageSpec, device: str = "cpu",
                 dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """uint8 [B, H, W, 3] (host array, or a tensor decoded on the device) -> normalised float
    [B, 3, H, W] on `device` (normalised in fp32).

    `images` may be a read-only view; it is only read. The uint8 bytes travel to the device as
    they are, from pinned memory without blocking the host on CUDA
    (`capfilt.model.transfer.upload`), and become floats there. The same operations in the same
    order as `(x / 255 - mean) / std`, so the same bits, done in place on one float buffer (no
    three more 1.7 MB buffers per 384-px image to allocate and fault in) and on rows of W x 3
    values with the per-channel constants tiled along them, so each pass is one vectorised sweep
    instead of a loop over 3-element channel groups. On CPU this took the step from ~3.3 to ~1.2
    core-ms per 384-px image (docs/benchmarks.md).
    """
    import torch

    from capfilt.model.transfer import upload

    if isinstance(images, torch.Tensor):  # decoded on the device already
        x = images.to(device).float()  # [B, H, W, 3]
    else:
        array = np.ascontiguousarray(images, dtype=np.uint8)  # no copy for a C-contiguous uint8 view
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read, never written
            x = upload(torch.from_numpy(array), device).float()  # [B, H, W, 3]: one float buffer
    b, h, w, _ = x.shape
    rows = x.view(b * h, w * 3)  # [B*H, W*3]
    rows.div_(255.0)  # [0, 1]
    rows.sub_(torch.tensor(spec.mean, device=device).repeat(w))  # [W*3]: R, G, B, R, G, B, ...
    rows.div_(torch.tensor(spec.std, device=device).repeat(w))
    x = x.permute(0, 3, 1, 2)  # [B, 3, H, W], channels-last in memory, as before
    return x.to(dtype) if dtype is not None else x


def _read_or_record(read, data: list[bytes | None], row: int, cfg: ImageConfig, errors: dict[int, str]):
    """`read(data[row], cfg)` (a bounded decoder or header check); None, with the row's
    "decode: <why>" in `errors`, when it refuses the image."""
    try:
        return read(data[row], cfg)
    except ImageError as err:
        errors[row] = f"decode: {err}"
        return None


@dataclass
class DecodedImages:
    """One block's images, decoded once in the model actor and normalised once per preprocessing.

    The model actors receive the encoded bytes (a JPEG is ~7x smaller than its pixels at 384 px)
    and decode their block here, through the one bounded decoder: a refused image costs its row a
    "decode: ..." reason, never the batch. An actor running both models (stages/fused.py) hands
    the same object to both, so each image is decoded, resized and normalised once.
    """

    rows: list[int]  # table rows whose image decoded, ascending
    errors: dict[int, str]  # table row -> "decode: <why>" for the refused ones
    pixels: dict  # side -> uint8 [len(rows), side, side, 3]: a numpy array, or a tensor on the device it was decoded on
    # table row -> the decoded RGB picture at its own shape (bounded by run.image), kept only for a
    # captioner whose processor resizes it itself (the generate families); empty for BLIP
    rgb: dict = field(default_factory=dict)
    _normalised: dict = field(default_factory=dict)  # (side, mean, std, device, dtype) -> [len(rows), 3, S, S]

    @classmethod
    def decode(cls, data: list[bytes | None], rows: list[int], cfg: ImageConfig, sides: set[int],
               device: "torch.device | None" = None, keep_rgb: bool = False) -> "DecodedImages":
        """Decode `data[i]` for each of `rows` and resize it to every side in `sides` (bicubic).

        `device`: a CUDA device to decode whole RGB/grey JPEGs on (nvJPEG, `capfilt.model.device_decode`,
        after the same header bounds); the pixels then stay there. None: the CPU decoder alone.
        `keep_rgb`: also keep each decoded picture as it is (`rgb`), for a model with its own
        processor; the CPU decoder then decodes (the processors take host pictures).
        """
        if device is not None and not keep_rgb:
            return cls._decode_on(device, data, rows, cfg, sides)
        good: list[int] = []
        errors: dict[int, str] = {}
        rgb: dict[int, Image.Image] = {}
        # Written in place, image by image: no list of arrays to stack (a second copy of the block).
        pixels = {side: np.empty((len(rows), side, side, 3), np.uint8) for side in sides}  # [N, S, S, 3]
        for row in rows:
            image = _read_or_record(decode_image, data, row, cfg, errors)
            if image is None:
                continue
            if keep_rgb:
                rgb[row] = image
            for side in sides:
                pixels[side][len(good)] = resize_uint8(image, side)
            good.append(row)
        pixels = {side: array[: len(good)] for side, array in pixels.items()}  # the decoded ones: a view
        return cls(good, errors, pixels, rgb)

    @classmethod
    def _decode_on(cls, device: "torch.device", data: list[bytes | None], rows: list[int], cfg: ImageConfig,
                   sides: set[int]) -> "DecodedImages":
        import torch

        from capfilt.model import device_decode
        from capfilt.model.images import open_image
        from capfilt.model.transfer import upload

        errors: dict[int, str] = {}
        on_device, on_host = [], []
        for row in rows:
            image = _read_or_record(open_image, data, row, cfg, errors)  # every bound, from the header
            if image is None:
                continue
            (on_device if device_decode.takes(image, data[row]) else on_host).append(row)
        decoded: dict[int, dict] = {}
        if on_device:
            try:
                decoded.update(zip(on_device, device_decode.decode_jpegs([data[r] for r in on_device], sides, device)))
            except RuntimeError:  # nvJPEG refused the batch: the CPU decoder decides each row, with its reason
                on_host += on_device
        for row in on_host:
            image = _read_or_record(decode_image, data, row, cfg, errors)
            if image is None:
                continue
            decoded[row] = {side: upload(torch.from_numpy(resize_uint8(image, side)), device) for side in sides}
        good = sorted(decoded)
        pixels = {side: torch.stack([decoded[row][side] for row in good]) if good
                  else torch.zeros((0, side, side, 3), dtype=torch.uint8, device=device) for side in sides}
        return cls(good, errors, pixels)

    def pictures(self, rows: list[int]) -> list[Image.Image]:
        """`rows` (decoded ones) as RGB pictures at their own shape (decoded with `keep_rgb`)."""
        return [self.rgb[row] for row in rows]

    def _positions(self, rows: list[int]) -> np.ndarray:
        index = {row: i for i, row in enumerate(self.rows)}
        return np.asarray([index[row] for row in rows], dtype=np.int64)

    def uint8(self, rows: list[int], side: int) -> np.ndarray:
        """`rows` (decoded ones) at `side`, on the host. -> uint8 [B, side, side, 3]"""
        pixels = self.pixels[side]
        if not isinstance(pixels, np.ndarray):  # decoded on the device
            pixels = pixels.cpu().numpy()
        return pixels[self._positions(rows)]

    def tensor(self, rows: list[int], spec: ImageSpec, device: "torch.device", dtype: "torch.dtype") -> "torch.Tensor":
        """`rows` (decoded ones) as a model's input: normalised [B, 3, S, S] on `device`.

        The whole block is normalised on the first call for this preprocessing (the next model
        with the same one reuses it); a model batch of consecutive rows is then a view of it.
        """
        import torch

        key = (spec.size, spec.mean, spec.std, str(device), dtype)
        if key not in self._normalised:
            self._normalised[key] = pixel_values(self.pixels[spec.size], spec, device, dtype)  # [N, 3, S, S]
        block = self._normalised[key]
        positions = self._positions(rows)
        if len(positions) and (np.diff(positions) == 1).all():
            return block[int(positions[0]) : int(positions[-1]) + 1]  # a view
        return block.index_select(0, torch.as_tensor(positions, device=block.device))
