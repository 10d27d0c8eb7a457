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
`BlipForImageTextRetrieval.forward` on the same prepared pairs (tests/capfilt/test_stages.py checks).
Calibration scores through this stage too (capfilt/calibrate.py), so a threshold is read off the
very numbers it is applied to. The filter decodes its block's images at its own side
(`capfilt.images.DecodedImages`), or takes the captioner's decoded block in the one-actor design
(stages/fused.py); it is the last stage that reads the image bytes, and its output leaves them out.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from capfilt import schema
from capfilt.config import FilterConfig, RunConfig, model_batch_size
from capfilt.embed import load_filter
from capfilt.images import DecodedImages
from capfilt.model import blip_ops
from capfilt.model.text import has_words
from capfilt.stages.common import Chaos, decode_device, map_rows_isolated, model_batches, scatter, usable_rows


class Filter:
    """Ray actor stage: loads the filter once; `__call__` adds the ITM/ITC score columns."""

    def __init__(self, cfg: RunConfig):
        self.cfg: FilterConfig = cfg.filter
        self.image_cfg = cfg.image
        self.chaos = Chaos("filter")  # fault injection, off unless CAPFILT_CHAOS names "filter"
        self.text_column, self.image_column = cfg.columns.text, cfg.columns.image
        self.blip = load_filter(self.cfg.model, *blip_ops.pick_device(cfg.resources.dtype))
        self.decode_on = decode_device(cfg, self.blip.device)  # None: the CPU decoder

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """Normalised [B, 3, S, S] images (`DecodedImages.tensor`) and each image's texts -> (ITM
        P(match), ITC cosine) per text."""
        blip = self.blip
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        owner = [i for i, group in enumerate(texts) for _ in group]  # [N] host ints: text n's image
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

    def __call__(self, batch: pa.Table, images: DecodedImages | None = None) -> pa.Table:
        """Adds the score columns and `_filter_error`, drops the image bytes; `images`: this
        block's, decoded already (by the captioner in the same actor)."""
        blip = self.blip
        usable = usable_rows(batch, schema.ERROR, schema.DECODE_ERROR, schema.CAPTION_ERROR)
        if images is None or blip.spec.size not in images.pixels:
            images = DecodedImages.decode(batch[self.image_column].to_pylist(), usable, self.image_cfg,
                                          {blip.spec.size}, self.decode_on)
        decoded = set(images.rows)
        web = batch[self.text_column].to_pylist()
        synthetic = batch[schema.SYNTHETIC].to_pylist()
        # A missing web caption, or one BLIP's cleaning leaves empty, is not scored (null): never kept.
        has_web = [isinstance(w, str) and has_words(w, self.cfg.max_text_tokens) for w in web]

        def run(subset: list[int]) -> list[tuple]:
            texts = [([web[i]] if has_web[i] else []) + list(synthetic[i]) for i in subset]
            itm, itc = self.score(images.tensor(subset, blip.spec, blip.device, blip.dtype), texts)
            return [(m, c, has_web[i]) for m, c, i in zip(itm, itc, subset)]

        size = model_batch_size(self.cfg, blip.device.type == "cuda")
        rows, scored, errors = map_rows_isolated(run, model_batches(batch, [i for i in usable if i in decoded], size),
                                                 "filter")
        self.chaos.tick()
        for row in usable:  # refused by the decoder here (the filter run alone: calibration, audit)
            if row not in decoded:
                rows.append(row)
                scored.append(None)
                errors.append(images.errors[row])
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
        # The last stage to read the image: the policy and writer tasks never receive it (the
        # commit takes every input column from the input shard).
        return batch.drop_columns([self.image_column])
