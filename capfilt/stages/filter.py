"""Stage 4: the filter. A BlipForImageTextRetrieval scores the web caption and every synthetic one.

For each text: ITM P(match) (the image-grounded text encoder with `[ENC]` first when the tokenizer
has it, else `[CLS]`, as BLIP scores) and the ITC cosine (unimodal text encoder on `[CLS]` vs the
image's projected first token, as `use_itm_head=False` computes it). Each image is encoded ONCE:
the vision model runs on the B images, then the text encoder runs on all of their texts with the
image embeddings repeated per text (index_select, no second vision pass), and the ITC image
feature is likewise projected once per image. The numbers equal stock
`BlipForImageTextRetrieval.forward` on the same pairs (tests/capfilt/test_stages.py checks).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from capfilt import schema
from capfilt.config import FilterConfig, RunConfig
from capfilt.images import load_image_spec, pixel_values
from capfilt.stages.common import (Chaos, enc_token_id, load_model, load_tokenizer, map_rows_isolated,
                                   model_batches, pick_device, scatter, unpack_pixels, usable_rows)

# Texts are cut to this many characters per allowed token before tokenising: a megabyte caption
# then costs what a normal one does. BERT's word pieces never span more than 100 characters (a
# longer word is one [UNK]), so the cut only changes texts padded with long runs of whitespace
# (or of characters the tokenizer drops).
CHARS_PER_TOKEN = 100


class Filter:
    """Ray actor stage: loads the filter once; `__call__` adds the ITM/ITC score columns."""

    def __init__(self, cfg: RunConfig):
        self.cfg: FilterConfig = cfg.filter
        self.chaos = Chaos("filter")  # fault injection, off unless CAPFILT_CHAOS names "filter"
        self.text_column = cfg.columns.text
        from transformers import BlipForImageTextRetrieval

        self.device, self.dtype = pick_device(cfg.resources.dtype)
        self.model = load_model(BlipForImageTextRetrieval, self.cfg.model, self.device, self.dtype)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.spec = load_image_spec(self.cfg.model)
        self.enc_token_id = enc_token_id(self.tokenizer)

    def _fit(self, images: np.ndarray) -> np.ndarray:
        """The decode stage sized images for the captioner; resize only if this model differs."""
        side = self.spec.size
        if images.shape[1] == side:
            return images
        return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC))
                         for im in images])

    @torch.no_grad()
    def score(self, images: np.ndarray, texts: list[list[str]]) -> tuple[list[list[float]], list[list[float]]]:
        """uint8 [B, S, S, 3] and each image's texts -> (ITM P(match), ITC cosine) per text."""
        model = self.model
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)  # [N]
        cut = self.cfg.max_text_tokens * CHARS_PER_TOKEN
        flat = [text[:cut] for group in texts for text in group]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        pixels = pixel_values(self._fit(images), self.spec, self.device, self.dtype)  # [B, 3, S, S]
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # [B, P, D]
        tokens = self.tokenizer(flat, padding="longest", truncation=True, max_length=self.cfg.max_text_tokens,
                                return_tensors="pt").to(self.device)
        cls_ids = tokens["input_ids"]  # [N, T], [CLS] first
        mask = tokens["attention_mask"]  # [N, T]

        # ITM: image-grounded encoder, each text against its own image's embeddings.
        itm_ids = cls_ids.clone()
        itm_ids[:, 0] = self.enc_token_id
        per_text = image_embeds.index_select(0, owner)  # [N, P, D]
        image_mask = torch.ones(per_text.shape[:2], dtype=torch.long, device=self.device)  # [N, P]
        fused = model.text_encoder(input_ids=itm_ids, attention_mask=mask, encoder_hidden_states=per_text,
                                   encoder_attention_mask=image_mask).last_hidden_state  # [N, T, H]
        itm = model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]  # [N]

        # ITC: unimodal text encoder vs the image's projected first token, projected once per image.
        text_hidden = model.text_encoder(input_ids=cls_ids, attention_mask=mask).last_hidden_state  # [N, T, H]
        text_feat = F.normalize(model.text_proj(text_hidden[:, 0, :]).float(), dim=-1)  # [N, E]
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)  # [B, E]
        itc = (image_feat.index_select(0, owner) * text_feat).sum(dim=-1)  # [N]

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
        pixels = batch[schema.PIXELS].to_pylist()
        # A missing or blank web caption is not scored (null), so it can never be kept.
        has_web = [isinstance(w, str) and bool(w.strip()) for w in web]

        def run(subset: list[int]) -> list[tuple]:
            texts = [([web[i]] if has_web[i] else []) + list(synthetic[i]) for i in subset]
            itm, itc = self.score(unpack_pixels([pixels[i] for i in subset]), texts)
            return [(m, c, has_web[i]) for m, c, i in zip(itm, itc, subset)]

        size = self.cfg.gpu_batch_size if self.device.type == "cuda" else self.cfg.batch_size
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
        return batch
