"""Bounded image decoding and BLIP preprocessing, shared by the pipeline, evaluation and training.

Web images are untrusted input. `decode_image` refuses, with an `ImageError` whose message says
why, anything it should not spend memory or trust on: oversized encodings, pixel counts over the
limit (read from the header, before any pixel is decoded), truncated files, formats outside an
allow-list (PIL's EPS plugin would run Ghostscript), degenerate sizes. What it returns is always an
8-bit RGB image: palette, alpha, CMYK and 16-bit modes are converted as BLIP's processor does
(transparency composited onto white).

Preprocessing follows transformers' `BlipImageProcessor`: bicubic resize to the model's square
size, rescale to [0, 1], normalise with the CLIP mean/std read from the model's
`preprocessor_config.json`.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from capfilt.config import ImageConfig
from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD


# Truncated files must raise, never decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # register every plugin now, so `formats=` can name any of them (MPO, WEBP, ...)


class ImageError(ValueError):
    """An image that is refused; the message is the per-row reason recorded in the output."""


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


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL decodes; alpha composited onto white like BlipImageProcessor."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | None, cfg: ImageConfig = ImageConfig()) -> Image.Image:
    """Decode untrusted bytes into an RGB image within `cfg`'s bounds, or raise `ImageError`."""
    if data is None or len(data) == 0:
        raise ImageError("no image bytes")
    if len(data) > cfg.max_bytes:
        raise ImageError(f"encoded size {len(data)} bytes is over run.image.max_bytes={cfg.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Names this Pillow does not know are skipped (JPEG covers MPO, for instance).
            img = Image.open(io.BytesIO(data), formats=[f.upper() for f in cfg.formats
                                                        if f.upper() in Image.OPEN])
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > cfg.max_pixels:
                raise ImageError(f"{width}x{height} pixels is over run.image.max_pixels={cfg.max_pixels}")
            if min(width, height) < cfg.min_side:
                raise ImageError(f"{width}x{height} is under run.image.min_side={cfg.min_side}")
            img.seek(0)  # first frame of an animation
            img.load()  # raises on truncated or corrupt data
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own header check (from 89 Mpx) runs inside Image.open, before ours.
        raise ImageError(f"decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image in an allowed format {list(cfg.formats)}") from None
    except OSError as err:
        if "truncated" in str(err):
            raise ImageError("truncated image") from None
        raise ImageError(f"corrupt image ({err})") from None
    except Exception as err:  # PIL plugins raise SyntaxError, struct.error, ...: all are per-row failures
        raise ImageError(f"corrupt image ({type(err).__name__}: {err})") from None


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to the model's square input, as BlipImageProcessor does. -> uint8 [size, size, 3]"""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def pixel_values(images: np.ndarray, spec: ImageSpec, device: str = "cpu",
                 dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] on `device` (normalised in fp32)."""
    import torch

    x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).to(device)  # [B, H, W, 3] uint8
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W] in [0, 1]
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype) if dtype is not None else x


def load_pixel_values(data: bytes | None, spec: ImageSpec, cfg: ImageConfig = ImageConfig()) -> "torch.Tensor":
    """One encoded image -> [1, 3, S, S] model input; raises `ImageError` like `decode_image`."""
    return pixel_values(resize_uint8(decode_image(data, cfg), spec.size)[None], spec)
