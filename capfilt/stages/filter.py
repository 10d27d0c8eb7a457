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

The named scorers of `run.scorers` (CLIP cosine, SigLIP probability, a BLIP retrieval folder's
ITM or ITC: capfilt/scoring.py) run here too, on the same texts (a web caption BLIP's cleaning
leaves empty none of them scores) and the block's decoded images (CLIP and SigLIP take the
pictures at their own shape, their processors resize them), each adding `score_<name>` and
`synthetic_score_<name>` (capfilt/schema.py). A row any of them fails on fails with the reason.
Without a BLIP filter (`run.filter.model` "", what a CLIP or SigLIP `--filter` becomes: the scorer
`filter`) the ITM and ITC columns are null and the named scorers alone decide.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from capfilt import schema
from capfilt.config import FilterConfig, RunConfig, model_batch_size
from capfilt.embed import load_filter
from capfilt.images import DecodedImages
from capfilt.model import blip_ops
from capfilt.model.hub import resolve_model
from capfilt.model.text import has_words
from capfilt.scoring import blip_scores, load_scorer
from capfilt.stages.common import Chaos, decode_device, map_rows_isolated, model_batches, scatter, usable_rows


class Filter:
    """Ray actor stage: loads the filter and the named scorers once; `__call__` adds the ITM/ITC score
    columns (null without a BLIP filter) and each scorer's."""

    def __init__(self, cfg: RunConfig):
        self.cfg: FilterConfig = cfg.filter
        self.image_cfg = cfg.image
        self.chaos = Chaos("filter")  # fault injection, off unless CAPFILT_CHAOS names "filter"
        self.text_column, self.image_column = cfg.columns.text, cfg.columns.image
        self.device, dtype = blip_ops.pick_device(cfg.resources.dtype)
        # Folders, or hub ids from this node's cache. No BLIP filter (run.filter.model ""): its ITM
        # and ITC columns are null and the named scorers decide.
        self.blip = load_filter(resolve_model(self.cfg.model), self.device, dtype) if self.cfg.model else None
        self.scorers = {s.name: load_scorer(s, resolve_model(s.model), self.cfg, self.device, dtype)
                        for s in cfg.scorers}
        # The sides the block is decoded at; a picture scorer's processor takes the pictures as they are.
        self.sides = set().union({self.blip.spec.size} if self.blip else set(),
                                 *(scorer.sides for scorer in self.scorers.values()))
        self.keep_rgb = any(scorer.keep_rgb for scorer in self.scorers.values())
        self.decode_on = decode_device(cfg, self.device)  # None: the CPU decoder (keep_rgb: always)

    def score(self, pixels: torch.Tensor, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """Normalised [B, 3, S, S] images (`DecodedImages.tensor`) and each image's texts -> (ITM
        P(match), ITC cosine) per text, from the BLIP filter."""
        return blip_scores(self.blip, pixels, texts, self.cfg)

    def __call__(self, batch: pa.Table, images: DecodedImages | None = None) -> pa.Table:
        """Adds the score columns and `_filter_error`, drops the image bytes; `images`: this
        block's, decoded already (by the captioner in the same actor)."""
        blip = self.blip
        usable = usable_rows(batch, schema.ERROR, schema.DECODE_ERROR, schema.CAPTION_ERROR)
        if images is None or not self.sides <= images.pixels.keys():
            images = DecodedImages.decode(batch[self.image_column].to_pylist(), usable, self.image_cfg,
                                          self.sides, self.decode_on, self.keep_rgb)
        decoded = set(images.rows)
        web = batch[self.text_column].to_pylist()
        synthetic = batch[schema.SYNTHETIC].to_pylist()
        # A missing web caption, or one BLIP's cleaning leaves empty, is not scored (null): never kept.
        has_web = [isinstance(w, str) and has_words(w, self.cfg.max_text_tokens) for w in web]

        def run(subset: list[int]) -> list[tuple]:
            texts = [([web[i]] if has_web[i] else []) + list(synthetic[i]) for i in subset]
            # Without a BLIP filter, a null (None) for each row's ITM and ITC.
            itm, itc = (self.score(images.tensor(subset, blip.spec, blip.device, blip.dtype), texts) if blip
                        else ([None] * len(subset), [None] * len(subset)))
            named = [scorer.score(images, subset, texts) for scorer in self.scorers.values()]
            return [(m, c, has_web[i], [scores[j] for scores in named]) for j, (m, c, i) in
                    enumerate(zip(itm, itc, subset))]

        size = model_batch_size(self.cfg, self.device.type == "cuda")
        rows, scored, errors = map_rows_isolated(run, model_batches(batch, [i for i in usable if i in decoded], size),
                                                 "filter")
        self.chaos.tick()
        for row in usable:  # refused by the decoder here (the filter run alone: calibration, audit)
            if row not in decoded:
                rows.append(row)
                scored.append(None)
                errors.append(images.errors[row])
        # One (web, synthetic) pair of columns per score: BLIP's ITM and ITC, then each named scorer's.
        names = [(schema.CAPTION_ITM, schema.SYNTHETIC_ITM), (schema.CAPTION_ITC, schema.SYNTHETIC_ITC)]
        names += [(schema.score_column(name), schema.synthetic_score_column(name)) for name in self.scorers]
        values: list[tuple[list, list]] = [([], []) for _ in names]
        for result in scored:
            if result is None:
                for web_column, synthetic_column in values:
                    web_column.append(None)
                    synthetic_column.append(None)
                continue
            itm, itc, scored_web, named = result
            for (web_column, synthetic_column), scores in zip(values, [itm, itc, *named]):
                web_column.append(scores[0] if scored_web and scores is not None else None)
                synthetic_column.append(scores[1:] if scored_web and scores is not None else scores)
        n = batch.num_rows
        columns = [column for (web_name, synthetic_name), (web_values, synthetic_values) in zip(names, values)
                   for column in ((web_name, web_values, pa.float32()),
                                  (synthetic_name, synthetic_values, pa.list_(pa.float32())))]
        columns.append((schema.FILTER_ERROR, errors, pa.string()))
        for name, values, arrow_type in columns:
            batch = batch.append_column(name, pa.array(scatter(values, rows, n), arrow_type))
        # The last stage to read the image: the policy and writer tasks never receive it (the
        # commit takes every input column from the input shard).
        return batch.drop_columns([self.image_column])
