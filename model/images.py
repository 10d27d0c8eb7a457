"""Bounded decoding of untrusted image bytes: the one decoder of the pipeline, evaluation and training.

Web images are untrusted input, and training reads the same raw web shards CapFilt does (round 0
pre-trains on them), so every reader decodes through `decode_image`. It refuses, with an
`ImageError` whose message says why, anything it should not spend memory or trust on: oversized
encodings, pixel counts over the limit (read from the header, before any pixel is decoded),
truncated files, formats outside an allow-list (PIL's EPS plugin would run Ghostscript),
degenerate sizes. What it returns is always an 8-bit RGB image: palette, alpha, CMYK and 16-bit
modes are converted as BLIP's processor does (transparency composited onto white).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from .image_config import ImageConfig


# Truncated files must raise, never decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # register every plugin now, so `formats=` can name any of them (MPO, WEBP, ...)


class ImageError(ValueError):
    """An image that is refused; the message is the per-row reason recorded in the output.

    `reason` is a short fixed name for counting (training reports refusals by it): no_bytes,
    max_bytes, max_pixels, min_side, bomb, format, truncated or corrupt.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


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
    return img if img.mode == "RGB" else img.convert("RGB")  # most web JPEGs: no copy


@contextlib.contextmanager
def _refusals(cfg: ImageConfig):
    """Whatever PIL raises on untrusted bytes, as the `ImageError` that names why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own header check (from 89 Mpx) runs inside Image.open, before ours.
        raise ImageError(f"decompression bomb ({err})", "bomb") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image in an allowed format {list(cfg.formats)}", "format") from None
    except OSError as err:
        if "truncated" in str(err):
            raise ImageError("truncated image", "truncated") from None
        raise ImageError(f"corrupt image ({err})", "corrupt") from None
    except Exception as err:  # PIL plugins raise SyntaxError, struct.error, ...: all are per-row failures
        raise ImageError(f"corrupt image ({type(err).__name__}: {err})", "corrupt") from None


def open_image(data: bytes | None, cfg: ImageConfig = ImageConfig()) -> Image.Image:
    """The header of untrusted bytes, every bound of `cfg` checked; no pixel is decoded yet."""
    if data is None or len(data) == 0:
        raise ImageError("no image bytes", "no_bytes")
    if len(data) > cfg.max_bytes:
        raise ImageError(f"encoded size {len(data)} bytes is over run.image.max_bytes={cfg.max_bytes}", "max_bytes")
    with _refusals(cfg):
        # Only the allowed plugins look at the bytes; names this Pillow does not know are
        # skipped (JPEG covers MPO, for instance).
        img = Image.open(io.BytesIO(data), formats=[f.upper() for f in cfg.formats if f.upper() in Image.OPEN])
        width, height = img.size  # from the header: nothing decoded yet
        if width * height > cfg.max_pixels:
            raise ImageError(f"{width}x{height} pixels is over run.image.max_pixels={cfg.max_pixels}", "max_pixels")
        if min(width, height) < cfg.min_side:
            raise ImageError(f"{width}x{height} is under run.image.min_side={cfg.min_side}", "min_side")
        return img


def decode_image(data: bytes | None, cfg: ImageConfig = ImageConfig()) -> Image.Image:
    """Decode untrusted bytes into an RGB image within `cfg`'s bounds, or raise `ImageError`."""
    img = open_image(data, cfg)
    with _refusals(cfg):
        img.seek(0)  # first frame of an animation
        img.load()  # raises on truncated or corrupt data
        return _to_rgb(img)
