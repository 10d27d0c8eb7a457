"""JPEG decoding and resizing on a CUDA device: batched nvJPEG (torchvision) and a bicubic resize there.

On a GPU host the bounded CPU decoder (`images.decode_image`, libjpeg-turbo through PIL) costs a
few core-ms per image, more than the rest of the pipeline's host work together; nvJPEG decodes a
batch on the device for a fraction of that. Nothing about the bounds changes: every image is
first opened on the host (`images.open_image`: allowed format, byte and pixel limits and the
minimum side, all from the header, before any pixel is decoded), and only baseline or progressive
JPEGs in RGB or greyscale that end with their end-of-image marker (a truncated file does not) go
to the device. Everything else (PNG, WebP, CMYK JPEGs, a batch nvJPEG refuses) is decoded by the
CPU decoder, which gives each refused row its reason.

The resize is torch's bicubic with antialiasing, PIL's filter up to rounding: the pixels differ
from the CPU path by a few levels at most (tests/model/test_device_decode.py, `gpu`), so the run
identity records the choice (`run.resources.decode_on_device`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

JPEG_END = b"\xff\xd9"  # the end-of-image marker


def takes(image: Image.Image, data: bytes) -> bool:
    """Whether the device decoder takes this opened (header-only) image: a whole RGB or grey JPEG."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and data.rstrip(b"\x00").endswith(JPEG_END)


def resize_on_device(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [3, H, W] on the device -> uint8 [side, side, 3], bicubic with antialiasing like PIL."""
    if image.shape[1:] == (side, side):
        return image.permute(1, 2, 0)
    x = F.interpolate(image[None].float(), size=(side, side), mode="bicubic", align_corners=False,
                      antialias=True)  # [1, 3, S, S]
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)  # [S, S, 3]


def decode_jpegs(data: list[bytes], sides: set[int], device: torch.device) -> list[dict[int, torch.Tensor]]:
    """JPEGs (each accepted by `takes`) decoded in one nvJPEG batch and resized to every side.

    -> per image {side: uint8 [side, side, 3] on `device`}. Raises if nvJPEG refuses the batch;
    the caller then decodes those images on the CPU, one by one, with their reasons.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]  # [n_bytes] each, host
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # [3, H, W] uint8 each
    return [{side: resize_on_device(image, side) for side in sides} for image in decoded]
