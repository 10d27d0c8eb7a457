"""Stage 3: the captioner. Writes `num_captions` captions per image.

A BlipForConditionalGeneration folder (the seed method's captioner) decodes as below. Any other
captioner family of `capfilt.model.families` (BLIP-2, InstructBLIP, Florence-2, LLaVA, Idefics3,
...) runs through `capfilt.model.captioners.GenerateCaptioner` in the same actor: it takes the
block's decoded pictures at their own shape (`DecodedImages.rgb`, decoded on the host), its own
processor resizes them, the same per-row seeds and lengths apply (docs/models.md).

Nucleus sampling (BLIP's CapFilt setting: top_k 50 then top_p 0.9, repetition penalty 1.1, the
prompt "a picture of " stripped) runs in capfilt.model.caption_decode's static-buffer loop, with
every caption seeded by its row key: row `key`'s k-th caption draws its random numbers from
seed(cfg.seed, key, k) alone, so a rerun, a different batch size or a different actor gives the
same caption. Beam search goes through transformers' `generate` (deterministic anyway). Both
towers compute attention through SDPA (capfilt.model.sdpa).

Lengths count new tokens, the prompt excluded (docs/data-format.md maps them to BLIP's, which
counted the prompt).
"""

from __future__ import annotations

import pyarrow as pa
import torch

from capfilt import schema
from capfilt.config import CaptionConfig, RunConfig, model_batch_size
from capfilt.embed import load_captioner
from capfilt.images import DecodedImages
from capfilt.model.blip_ops import pick_device
from capfilt.model.caption_decode import Chooser, DecodeSettings, StaticDecoder, decode_captions, nucleus
from capfilt.model.captioners import GenerateCaptioner
from capfilt.model.families import detect, expect_role
from capfilt.model.hub import resolve_model
from capfilt.model.row_seeds import row_seed, row_uniforms
from capfilt.stages.common import Chaos, decode_device, map_rows_isolated, model_batches, scatter, usable_rows


class Captioner:
    """Ray actor stage: loads the captioner once; `__call__` decodes its block's images and adds
    `synthetic` (a list of K strings per row)."""

    def __init__(self, cfg: RunConfig):
        self.cfg: CaptionConfig = cfg.caption
        self.image_cfg = cfg.image
        self.chaos = Chaos("caption")  # fault injection, off unless CAPFILT_CHAOS names "caption"
        self.key_column, self.image_column = cfg.columns.key, cfg.columns.image
        folder = resolve_model(self.cfg.model)  # a folder, or a hub id from this node's cache
        family = expect_role(detect(folder), "captioner", self.cfg.model)
        # None: BLIP's own decoder below. Else the family's generate, on host-decoded pictures.
        self.generator: GenerateCaptioner | None = None
        if family.kind == "generate":
            self.generator = GenerateCaptioner(folder, self.cfg, *pick_device(cfg.resources.dtype), family=family)
            self.device, self.dtype = self.generator.device, self.generator.dtype
            self.decode_on, self.sides, self.keep_rgb = None, set(), True
            return
        self.blip = load_captioner(folder, *pick_device(cfg.resources.dtype))  # the shared loader
        self.model, self.tokenizer, self.spec = self.blip.model, self.blip.tokenizer, self.blip.spec
        self.device, self.dtype = self.blip.device, self.blip.dtype
        self.decode_on = decode_device(cfg, self.device)  # None: the CPU decoder
        self.sides, self.keep_rgb = {self.spec.size}, False  # what the block is decoded to for this model
        text_config = self.model.config.text_config
        self.eos_token_id = text_config.sep_token_id  # BLIP ends captions with [SEP]
        self.pad_token_id = text_config.pad_token_id
        # [DEC] + the prompt's word pieces, as BLIP builds the decoder input (no trailing [SEP]).
        pieces = self.tokenizer(self.cfg.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = torch.tensor([text_config.bos_token_id, *pieces], device=self.device)  # [T0]
        self.settings = DecodeSettings(min_new_tokens=self.cfg.min_length, max_new_tokens=self.cfg.max_length,
                                       repetition_penalty=self.cfg.repetition_penalty,
                                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                       check_every=self.cfg.eos_check_every)
        self.decoder = StaticDecoder(self.model.text_decoder)
        # Shapes change only when finished images leave, so a compiled step is captured a few times.
        self.step = (torch.compile(self.decoder.step, mode="reduce-overhead") if self.cfg.cuda_graphs
                     else self.decoder.step)

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, keys: list[str], choose: Chooser | None = None) -> list[list[str]]:
        """Normalised [B, 3, S, S] images (`DecodedImages.tensor`) -> K captions each (prompt
        stripped), seeded by `keys`. `choose` overrides the sampler (an argmax gives greedy decoding).
        """
        cfg = self.cfg
        k = cfg.num_captions
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [B, P, D]
        if cfg.beam and choose is None:
            ids = self._beam(image_embeds)  # [B * K, T]
        else:
            seeds = [row_seed(cfg.seed, key, j) for key in keys for j in range(k)]
            ids = decode_captions(self.decoder, image_embeds, self.prompt_ids, k,
                                  choose or nucleus(cfg.top_p, cfg.top_k), row_uniforms(seeds, cfg.max_length),
                                  self.settings, step=self.step)  # [B * K, T]
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return [texts[i * k : (i + 1) * k] for i in range(len(keys))]

    def _beam(self, image_embeds: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n = image_embeds.shape[0]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        prompt = self.prompt_ids.expand(n, -1)  # [B, T0]
        out = self.model.text_decoder.generate(
            input_ids=prompt, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            num_beams=max(cfg.num_beams, cfg.num_captions), num_return_sequences=cfg.num_captions,
            do_sample=False, min_new_tokens=cfg.min_length, max_new_tokens=cfg.max_length,
            repetition_penalty=cfg.repetition_penalty, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id)
        return out[:, prompt.shape[1]:]  # [B * K, T]

    def decode(self, batch: pa.Table) -> DecodedImages:
        """The block's images, decoded at this model's side, for the rows no stage has failed."""
        rows = usable_rows(batch, schema.ERROR)
        return DecodedImages.decode(batch[self.image_column].to_pylist(), rows, self.image_cfg, self.sides,
                                    self.decode_on, self.keep_rgb)

    def __call__(self, batch: pa.Table, images: DecodedImages | None = None) -> pa.Table:
        """Adds `_decode_error`, `synthetic` and `_caption_error`; `images`: this block's, decoded already."""
        images = images or self.decode(batch)
        keys = batch[self.key_column].to_pylist()

        def run(subset: list[int]) -> list[list[str]]:
            if self.generator is not None:
                return self.generator.caption(images.pictures(subset), [keys[i] for i in subset])
            return self.caption(images.tensor(subset, self.spec, self.device, self.dtype), [keys[i] for i in subset])

        size = model_batch_size(self.cfg, self.device.type == "cuda")
        rows, captions, errors = map_rows_isolated(run, model_batches(batch, images.rows, size), "caption")
        self.chaos.tick()
        n = batch.num_rows
        decode_errors = [images.errors.get(i) for i in range(n)]
        batch = batch.append_column(schema.DECODE_ERROR, pa.array(decode_errors, pa.string()))
        batch = batch.append_column(schema.SYNTHETIC, pa.array(scatter(captions, rows, n),
                                                               pa.list_(pa.string())))
        return batch.append_column(schema.CAPTION_ERROR, pa.array(scatter(errors, rows, n), pa.string()))
