"""Stage 3: the captioner. A BlipForConditionalGeneration writes `num_captions` captions per image.

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

import hashlib

import numpy as np
import pyarrow as pa
import torch

from capfilt import schema
from capfilt.config import CaptionConfig, RunConfig, model_batch_size
from capfilt.images import load_image_spec, pixel_values
from capfilt.model.blip_ops import pick_device
from capfilt.model.caption_decode import Chooser, DecodeSettings, StaticDecoder, decode_captions, nucleus
from capfilt.model.sdpa import use_sdpa
from capfilt.stages.common import (Chaos, load_model, load_tokenizer, map_rows_isolated, model_batches, pixel_array,
                                   pixel_rows, scatter, usable_rows)


def row_seed(seed: int, key: str, k: int) -> int:
    """A 63-bit seed for the k-th caption of row `key`, independent of batching and process."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """One uniform per row and step, each row from its own generator. -> [N, steps] float32 (CPU)"""
    out = torch.empty(len(seeds), steps)
    for i, seed in enumerate(seeds):
        out[i] = torch.rand(steps, generator=torch.Generator().manual_seed(seed))
    return out


class Captioner:
    """Ray actor stage: loads the captioner once; `__call__` adds `synthetic` (list of K strings)."""

    def __init__(self, cfg: RunConfig):
        self.cfg: CaptionConfig = cfg.caption
        self.chaos = Chaos("caption")  # fault injection, off unless CAPFILT_CHAOS names "caption"
        self.key_column = cfg.columns.key
        from transformers import BlipForConditionalGeneration

        self.device, self.dtype = pick_device(cfg.resources.dtype)
        self.model = load_model(BlipForConditionalGeneration, self.cfg.model, self.device, self.dtype)
        use_sdpa(self.model)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.spec = load_image_spec(self.cfg.model)
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
    def caption(self, images: np.ndarray, keys: list[str], choose: Chooser | None = None) -> list[list[str]]:
        """uint8 [B, S, S, 3] images -> K captions each (prompt stripped), seeded by `keys`.

        `choose` overrides the sampler (an argmax gives greedy decoding).
        """
        cfg = self.cfg
        k = cfg.num_captions
        pixels = pixel_values(images, self.spec, self.device, self.dtype)  # [B, 3, S, S]
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = usable_rows(batch, schema.ERROR)
        keys = batch[self.key_column].to_pylist()
        pixels = pixel_array(batch)  # read in place, per model batch (pixel_rows)

        def run(subset: list[int]) -> list[list[str]]:
            return self.caption(pixel_rows(pixels, subset), [keys[i] for i in subset])

        size = model_batch_size(self.cfg, self.device.type == "cuda")
        rows, captions, errors = map_rows_isolated(run, model_batches(batch, rows, size), "caption")
        self.chaos.tick()
        n = batch.num_rows
        batch = batch.append_column(schema.SYNTHETIC, pa.array(scatter(captions, rows, n),
                                                               pa.list_(pa.string())))
        return batch.append_column(schema.CAPTION_ERROR, pa.array(scatter(errors, rows, n), pa.string()))
