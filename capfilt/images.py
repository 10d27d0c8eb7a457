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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD
from capfilt.model.images import ImageError, decode_image

if TYPE_CHECKING:  # torch is imported where it is used: a decode worker never pays for it
    import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "ImageError", "ImageSpec", "decode_image", "load_image_spec",
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


def pixel_values(images: np.ndarray, spec: ImageSpec, device: str = "cpu",
                 dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] on `device` (normalised in fp32).

    `images` may be a read-only view (of an Arrow buffer: `stages.common.pixel_rows`); it is only
    read. The uint8 bytes travel to the device as they are, from pinned memory without blocking
    the host on CUDA (`capfilt.model.transfer.upload`), and become floats there.
    """
    import torch

    from capfilt.model.transfer import upload

    array = np.ascontiguousarray(images, dtype=np.uint8)  # no copy for a C-contiguous uint8 view
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read, never written
        x = upload(torch.from_numpy(array), device)  # [B, H, W, 3] uint8
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W] in [0, 1]
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype) if dtype is not None else x
