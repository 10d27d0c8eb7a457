"""Stage 4: the filter. A BlipForImageTextRetrieval scores the web caption and every synthetic one.

For each text: ITM P(match) and the ITC cosine as BLIP computes them (`capfilt.model.blip_ops`:
`[ENC]` first for ITM, BLIP's id 30523 for the published folders whose tokenizer lacks it; `[CLS]`
for ITC). Every text is scored as BLIP's retrieval evaluation prepares it (`capfilt.model.text`:
cut to 100 characters per token, BLIP's `pre_caption` with 30 words, then at most
`run.filter.max_text_tokens` tokens); the output keeps the texts as they were. A web caption that
the cleaning leaves empty is not scored. Each image is encoded ONCE: the vision model runs on the
B images, then one pass of the text encoder over all of their texts for ITM and ITC together,
each image's cross-attention keys/values projected once for its texts, texts grouped by length
(`run.filter.bucket_tokens`; `capfilt.model.text_pass`). The numbers equal stock
`BlipForImageTextRetrieval.forward` on the same prepared pairs (tests/capfilt/test_stages.py checks). Calibration scores through this
stage too (capfilt/calibrate.py), so a threshold is read off the very numbers it is applied to.
The filter is the last stage that needs the decoded pixels; its output leaves them out.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from capfilt import schema
from capfilt.config import FilterConfig, RunConfig, model_batch_size
from capfilt.embed import load_filter
from capfilt.images import pixel_values
from capfilt.model import blip_ops
from capfilt.model.text import has_words
from capfilt.stages.common import (Chaos, map_rows_isolated, model_batches, pixel_array, pixel_rows, scatter,
                                   usable_rows)


class Filter:
    """Ray actor stage: loads the filter once; `__call__` adds the ITM/ITC score columns."""

    def __init__(self, cfg: RunConfig):
        self.cfg: FilterConfig = cfg.filter
        self.chaos = Chaos("filter")  # fault injection, off unless CAPFILT_CHAOS names "filter"
        self.text_column = cfg.columns.text
        self.blip = load_filter(self.cfg.model, *blip_ops.pick_device(cfg.resources.dtype))

    def _fit(self, images: np.ndarray) -> np.ndarray:
        """The decode stage sized images for the captioner; resize only if this model differs."""
        side = self.blip.spec.size
        if images.shape[1] == side:
            return images
        return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC))
                         for im in images])

    @torch.no_grad()
    def score(self, images: np.ndarray, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """uint8 [B, S, S, 3] and each image's texts -> (ITM P(match), ITC cosine) per text."""
        blip = self.blip
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        owner = [i for i, group in enumerate(texts) for _ in group]  # [N] host ints: text n's image
        pixels = pixel_values(self._fit(images), blip.spec, blip.device, blip.dtype)  # [B, 3, S, S]
        # On the host: the text pass plans its length buckets from the mask without a device sync.
        ids, mask = blip_ops.tokenize(blip.tokenizer, flat, self.cfg.max_text_tokens)  # [N, T]
        itm, itc = blip_ops.score(blip.towers, pixels, owner, ids, mask, blip.enc_token_id,
                                  self.cfg.bucket_tokens)  # [N], [N]
        itm_list, itc_list = itm.cpu().tolist(), itc.cpu().tolist()
        out_itm, out_itc, start = [], [], 0
        for group in texts:
            out_itm.append(itm_list[start : start + len(group)])
            out_itc.append(itc_list[start : start + len(group)])
            start += len(group)
        return out_itm, out_itc

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = usable_rows(batch, schema.ERROR, schema.CAPTION_ERROR)
        web = batch[self.text_column].to_pylist()
        synthetic = batch[schema.SYNTHETIC].to_pylist()
        pixels = pixel_array(batch)  # read in place, per model batch (pixel_rows)
        # A missing web caption, or one BLIP's cleaning leaves empty, is not scored (null): never kept.
        has_web = [isinstance(w, str) and has_words(w, self.cfg.max_text_tokens) for w in web]

        def run(subset: list[int]) -> list[tuple]:
            texts = [([web[i]] if has_web[i] else []) + list(synthetic[i]) for i in subset]
            itm, itc = self.score(pixel_rows(pixels, subset), texts)
            return [(m, c, has_web[i]) for m, c, i in zip(itm, itc, subset)]

        size = model_batch_size(self.cfg, self.blip.device.type == "cuda")
        rows, scored, errors = map_rows_isolated(run, model_batches(batch, rows, size), "filter")
        self.chaos.tick()
        caption_itm, caption_itc, synthetic_itm, synthetic_itc = [], [], [], []
        for result in scored:
            if result is None:
                for column in (caption_itm, caption_itc, synthetic_itm, synthetic_itc):
                    column.append(None)
                continue
            itm, itc, scored_web = result
            caption_itm.append(itm[0] if scored_web else None)
            caption_itc.append(itc[0] if scored_web else None)
            synthetic_itm.append(itm[1:] if scored_web else itm)
            synthetic_itc.append(itc[1:] if scored_web else itc)
        n = batch.num_rows
        columns = [
            (schema.CAPTION_ITM, caption_itm, pa.float32()),
            (schema.CAPTION_ITC, caption_itc, pa.float32()),
            (schema.SYNTHETIC_ITM, synthetic_itm, pa.list_(pa.float32())),
            (schema.SYNTHETIC_ITC, synthetic_itc, pa.list_(pa.float32())),
            (schema.FILTER_ERROR, errors, pa.string()),
        ]
        for name, values, arrow_type in columns:
            batch = batch.append_column(name, pa.array(scatter(values, rows, n), arrow_type))
        # The last model to use the pixels: dropped here, so the policy and writer tasks never
        # receive them (432 KiB per row at 384 px, ~20x the JPEG, through the object store).
        return batch.drop_columns([schema.PIXELS])
