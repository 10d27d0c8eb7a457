"""`ImageConfig`: the limits of untrusted image decoding, in a module without PIL or torch.

One decoder (`model.images.decode_image`) serves the CapFilt pipeline, evaluation and training,
so one set of limits does too: `capfilt.config` embeds this class as the `run.image` section
(as it embeds `model.train_config.TrainConfig` as `train`) and training is handed the same values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageConfig:
    max_pixels: int = 40_000_000  # decoded width*height above this is refused (decompression bombs)
    max_bytes: int = 20_000_000  # encoded size above this is refused before decoding
    min_side: int = 8  # images smaller than this on either side are refused as unusable
    # PIL formats tried; others are refused (EPS would run Ghostscript, exotic plugins add risk)
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
