"""Stages 3 + 4 in one process: the captioner and the filter in one model actor (`run.resources.fuse_models`).

On one GPU the two pools are two processes that time-slice it, and every batch of pixels goes
through the object store between them. This actor loads both models and runs the captioner's
`__call__` then the filter's on the same batch, so the pixels are read once from the block it
was given and nothing passes between processes. The numbers are the two pools' (the same
stages, the same model batches: `model_batches` cuts by row position, not by block). The two
separate pools stay the default, and the choice for clusters, until a GPU run shows this faster.
"""

from __future__ import annotations

import pyarrow as pa

from capfilt.config import RunConfig
from capfilt.stages.caption import Captioner
from capfilt.stages.filter import Filter


class CaptionAndFilter:
    """Ray actor stage: both models loaded once; `__call__` adds the captioner's and the filter's columns."""

    def __init__(self, cfg: RunConfig):
        self.captioner = Captioner(cfg)
        self.filter = Filter(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.filter(self.captioner(batch))
