"""Stage 3: the captioner. A BlipForConditionalGeneration writes `num_captions` captions per image.

Nucleus sampling (BLIP's CapFilt setting: top_p 0.9, repetition penalty, the prompt "a picture
of " stripped) runs in this module's own decode loop so that every caption is seeded by its row
key: row `key`'s k-th caption draws its random numbers from seed(cfg.seed, key, k) alone, so a
rerun, a different batch size or a different actor gives the same caption. Beam search goes
through transformers' `generate` (deterministic anyway).

The loop is a plain function of (text decoder, image embeddings, prompt, token chooser); a faster
loop (static KV cache, CUDA graphs) replaces `decode_loop` without the pipeline noticing.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from capfilt import schema
from capfilt.config import CaptionConfig, RunConfig
from capfilt.images import load_image_spec, pixel_values
from capfilt.stages.common import (Chaos, load_model, load_tokenizer, map_rows_isolated, model_batches,
                                   pick_device, scatter, unpack_pixels, usable_rows)

# Picks the next token from fp32 logits [N, V] at a step -> ids [N].
Chooser = Callable[[torch.Tensor, int], torch.Tensor]
NUCLEUS_CANDIDATES = 256  # top-k tried before a full vocabulary sort (a trained model's nucleus is small)


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


def greedy(logits: torch.Tensor, step: int) -> torch.Tensor:
    return logits.argmax(dim=-1)


def nucleus(uniforms: torch.Tensor, top_p: float) -> Chooser:
    """Top-p sampling by inverse CDF with per-row uniforms [N, steps] (no shared RNG state)."""

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        probs = logits.softmax(dim=-1)  # [N, V]
        # The nucleus is a prefix of the sorted vocabulary: when the top candidates hold top_p of
        # the mass in every row, sorting them alone gives the same tokens as sorting everything.
        sorted_probs, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # [N, C]
        if not bool((sorted_probs.sum(dim=-1) >= top_p).all()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # [N, V]
        cumulative = sorted_probs.cumsum(dim=-1)  # [N, V]
        # Keep the smallest prefix holding top_p of the mass (the first token always stays).
        kept = sorted_probs * ((cumulative - sorted_probs) < top_p)  # [N, V]
        cdf = kept.cumsum(dim=-1)  # [N, V]
        target = uniforms[:, step : step + 1].to(cdf.device) * cdf[:, -1:]  # [N, 1]
        position = (cdf < target).sum(dim=-1).clamp(max=cdf.shape[-1] - 1)  # [N]
        return order.gather(-1, position[:, None]).squeeze(-1)  # [N]

    return choose


@torch.no_grad()
def decode_loop(text_decoder: torch.nn.Module, image_embeds: torch.Tensor, prompt_ids: torch.Tensor,
                choose: Chooser, min_new_tokens: int, max_new_tokens: int, repetition_penalty: float,
                eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Autoregressive decoding with a KV cache, as transformers' generate does it.

    image_embeds [N, P, D], prompt_ids [N, T0] -> new token ids [N, <= max_new_tokens], padded
    with `pad_token_id` after each row's end-of-sequence. The logits pipeline is generate's:
    repetition penalty over the whole sequence, end-of-sequence banned before `min_new_tokens`,
    then `choose`.
    """
    n = image_embeds.shape[0]
    device = image_embeds.device
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)  # [N, P]
    sequence = prompt_ids.to(device)  # [N, T]
    step_input = sequence
    past = None
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    for step in range(max_new_tokens):
        out = text_decoder(input_ids=step_input, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, past_key_values=past, use_cache=True,
                           logits_to_keep=1)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()  # [N, V]
        if repetition_penalty != 1.0:
            seen = logits.gather(1, sequence)  # [N, T]
            seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
            logits = logits.scatter(1, sequence, seen)
        if step < min_new_tokens:
            logits[:, eos_token_id] = -float("inf")
        token = choose(logits, step)  # [N]
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        finished |= token == eos_token_id
        sequence = torch.cat([sequence, token[:, None]], dim=1)  # [N, T + 1]
        step_input = token[:, None]  # [N, 1]
        if bool(finished.all()):
            break
    return sequence[:, prompt_ids.shape[1]:]


class Captioner:
    """Ray actor stage: loads the captioner once; `__call__` adds `synthetic` (list of K strings)."""

    def __init__(self, cfg: RunConfig):
        self.cfg: CaptionConfig = cfg.caption
        self.chaos = Chaos("caption")  # fault injection, off unless CAPFILT_CHAOS names "caption"
        self.key_column = cfg.columns.key
        if self.cfg.num_captions < 1:
            raise ValueError(f"run.caption.num_captions must be at least 1, got {self.cfg.num_captions}")
        from transformers import BlipForConditionalGeneration

        self.device, self.dtype = pick_device(cfg.resources.dtype)
        self.model = load_model(BlipForConditionalGeneration, self.cfg.model, self.device, self.dtype)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.spec = load_image_spec(self.cfg.model)
        text_config = self.model.config.text_config
        self.eos_token_id = text_config.sep_token_id  # BLIP ends captions with [SEP]
        self.pad_token_id = text_config.pad_token_id
        # [DEC] + the prompt's word pieces, as BLIP builds the decoder input (no trailing [SEP]).
        pieces = self.tokenizer(self.cfg.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = torch.tensor([text_config.bos_token_id, *pieces], device=self.device)  # [T0]

    @torch.no_grad()
    def caption(self, images: np.ndarray, keys: list[str], choose: Chooser | None = None) -> list[list[str]]:
        """uint8 [B, S, S, 3] images -> K captions each (prompt stripped), seeded by `keys`.

        `choose` overrides the sampler (the tests pass `greedy`).
        """
        cfg = self.cfg
        k = cfg.num_captions
        pixels = pixel_values(images, self.spec, self.device, self.dtype)  # [B, 3, S, S]
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [B, P, D]
        if cfg.beam and choose is None:
            ids = self._beam(image_embeds)  # [B * K, T]
        else:
            image_embeds = image_embeds.repeat_interleave(k, dim=0)  # [B * K, P, D]
            if choose is None:
                seeds = [row_seed(cfg.seed, key, j) for key in keys for j in range(k)]
                choose = nucleus(row_uniforms(seeds, cfg.max_length), cfg.top_p)
            prompt = self.prompt_ids.expand(image_embeds.shape[0], -1)  # [B * K, T0]
            ids = decode_loop(self.model.text_decoder, image_embeds, prompt, choose, cfg.min_length,
                              cfg.max_length, cfg.repetition_penalty, self.eos_token_id, self.pad_token_id)
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
        pixels = batch[schema.PIXELS].to_pylist()

        def run(subset: list[int]) -> list[list[str]]:
            return self.caption(unpack_pixels([pixels[i] for i in subset]), [keys[i] for i in subset])

        size = self.cfg.gpu_batch_size if self.device.type == "cuda" else self.cfg.batch_size
        rows, captions, errors = map_rows_isolated(run, model_batches(batch, rows, size), "caption")
        self.chaos.tick()
        n = batch.num_rows
        batch = batch.append_column(schema.SYNTHETIC, pa.array(scatter(captions, rows, n),
                                                               pa.list_(pa.string())))
        return batch.append_column(schema.CAPTION_ERROR, pa.array(scatter(errors, rows, n), pa.string()))
