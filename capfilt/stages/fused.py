"""Stages 3 + 4 in one process: the captioner and the filter in one model actor (the default).

The actor decodes its block once (at both models' sides when they differ), normalises each image
once for both models when their preprocessing is the same, runs the captioner's `__call__` then
the filter's on the same batch, and returns scores and texts only: no pixel and no image byte
leaves it. With two pools (`run.resources.fuse_models=false`) the captioner's output still
carries the image bytes to the filter, which decodes them again. The numbers are the two pools'
(the same stages, the same model batches: `model_batches` cuts by row position, not by block).
"""

from __future__ import annotations

import pyarrow as pa

from capfilt import schema
from capfilt.config import RunConfig
from capfilt.images import DecodedImages
from capfilt.stages.caption import Captioner
from capfilt.stages.common import usable_rows
from capfilt.stages.filter import Filter


class CaptionAndFilter:
    """Ray actor stage: both models loaded once; `__call__` adds the captioner's and the filter's columns."""

    def __init__(self, cfg: RunConfig):
        self.captioner = Captioner(cfg)
        self.filter = Filter(cfg)
        self.image_column = cfg.columns.image
        self.image_cfg = cfg.image
        self.sides = self.captioner.sides | self.filter.sides
        # A generate captioner or a named scorer takes the decoded pictures as they are (host-decoded).
        self.keep_rgb = self.captioner.keep_rgb or self.filter.keep_rgb

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = DecodedImages.decode(batch[self.image_column].to_pylist(), usable_rows(batch, schema.ERROR),
                                      self.image_cfg, self.sides, self.captioner.decode_on, self.keep_rgb)
        return self.filter(self.captioner(batch, images), images)
