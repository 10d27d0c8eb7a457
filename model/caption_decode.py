"""Caption decoding with static buffers for a loaded transformers BLIP text decoder.

`decode_captions` writes K captions per image with the decoder's own weights (its Linear,
LayerNorm, embedding and LM-head modules), but not through its `forward`, so that:

- the cross-attention keys/values of every layer are projected ONCE per image and shared by
  that image's K captions: the K rows of an image attend to them as K queries of one SDPA call
  (grouped queries), nothing is repeated K times;
- the prompt is run once per image (its K captions share it) and its self-attention keys/values
  fill a preallocated cache [N, heads, prompt + max_new_tokens, head_dim], which each step writes
  one position of, attending over it with a position mask (the step's shapes stay fixed);
- the logits pipeline is generate's (repetition penalty over the whole sequence, end-of-sequence
  banned before `min_new_tokens`, then the chooser, e.g. `nucleus`: top-k then top-p), all on the
  device; the random numbers (one per row and step) are uploaded once;
- the host reads the device every `check_every` steps only (which images have finished all
  their captions), and then drops finished images from every buffer when the rows saved over
  the remaining steps outweigh the copy.

Greedy decoding is token-identical to transformers' `generate` (tests/capfilt/test_stages.py).
Shapes: B images, K captions each, N = B * K rows (row n is caption n % K of image n // K),
P image tokens, H heads, d = head width, L = prompt + max_new_tokens positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .text_attention import cross_attend, merge_heads, project_image, split_heads

# (fp32 logits [N, V], one uniform per row [N]) -> token ids [N]
Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nucleus(top_p: float, top_k: int) -> Chooser:
    """generate's top-k then top-p filtering, sampled by inverse CDF with each row's own uniform.

    top_k 0 keeps the whole vocabulary (one full sort per step). Tokens tied with the k-th logit
    are cut where transformers keeps them all (a measure-zero event for real logits).
    """

    def choose(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        if 0 < top_k < logits.shape[-1]:
            top, order = logits.topk(top_k, dim=-1)  # [N, k], descending
        else:
            top, order = logits.sort(dim=-1, descending=True)  # [N, V]
        probs = top.softmax(dim=-1)  # the kept logits renormalised, as top-p sees them
        before = probs.cumsum(dim=-1) - probs  # [N, k] mass ranked above each token
        kept = probs * (before < top_p)  # the smallest prefix holding top_p (the first always stays)
        cdf = kept.cumsum(dim=-1)  # [N, k]
        position = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=cdf.shape[-1] - 1)  # [N]
        return order.gather(-1, position[:, None]).squeeze(-1)  # [N]

    return choose


@dataclass(frozen=True)
class DecodeSettings:
    min_new_tokens: int  # end-of-sequence is banned before this many new tokens
    max_new_tokens: int  # new tokens at most, end-of-sequence included
    repetition_penalty: float  # generate's: seen tokens' logits divided (positive) or multiplied (negative)
    eos_token_id: int
    pad_token_id: int  # written after a row's end-of-sequence
    check_every: int  # decode steps between end-of-sequence checks (one host sync each)


class StaticDecoder:
    """A loaded `BlipTextLMHeadModel`'s weights, run over caller-owned static buffers."""

    def __init__(self, text_decoder: torch.nn.Module):
        self.layers = text_decoder.bert.encoder.layer
        self.embeddings = text_decoder.bert.embeddings
        self.head = text_decoder.cls
        self.heads = text_decoder.config.num_attention_heads
        self.head_width = text_decoder.config.hidden_size // self.heads  # d: the text tower's, not the image's
        self.max_positions = text_decoder.config.max_position_embeddings

    def project_image(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys and values, once per image: [(k, v)], each [B, H, P, d]."""
        return project_image(self.layers, self.heads, image_embeds)

    def empty_cache(self, rows: int, length: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed self-attention keys/values per layer, each [rows, H, length, d] (zeros: masked slots stay
        finite), of `like`'s dtype and device."""
        shape = (rows, self.heads, length, self.head_width)
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in self.layers]

    def _finish_layer(self, layer, hidden: torch.Tensor, self_context: torch.Tensor,
                      cross: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Self-attention output, cross-attention, feed-forward: stock BlipTextLayer after its self-attention core."""
        hidden = layer.attention.output(merge_heads(self_context), hidden)  # [R, T, D]
        query = split_heads(layer.crossattention.self.query(hidden), self.heads)  # [R, H, T, d]
        hidden = layer.crossattention.output(merge_heads(cross_attend(query, *cross)), hidden)  # [R, T, D]
        return layer.feed_forward_chunk(hidden)  # [R, T, D]

    def prefill(self, prompt_ids: torch.Tensor, cross: list, cache: list, captions: int) -> torch.Tensor:
        """The prompt [T0], once per image; fills cache positions [0, T0) of all K captions. -> logits [B, V]"""
        images = cross[0][0].shape[0]
        hidden = self.embeddings(input_ids=prompt_ids.expand(images, -1))  # [B, T0, D]
        t0 = prompt_ids.shape[0]
        for layer, image_kv, (keys, values) in zip(self.layers, cross, cache):
            attention = layer.attention.self
            q, k, v = (split_heads(proj(hidden), self.heads)
                       for proj in (attention.query, attention.key, attention.value))  # [B, H, T0, d]
            # Every caption of an image starts from the same prompt states.
            keys.view(images, captions, *keys.shape[1:])[:, :, :, :t0] = k[:, None]
            values.view(images, captions, *values.shape[1:])[:, :, :, :t0] = v[:, None]
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T0, d]
            hidden = self._finish_layer(layer, hidden, context, image_kv)
        return self.head(hidden[:, -1])  # [B, V]

    def step(self, tokens: torch.Tensor, position: torch.Tensor, cross: list, cache: list) -> torch.Tensor:
        """tokens [N] at `position` (a device scalar: no host value, fixed shapes) -> logits [N, V]."""
        hidden = self.embeddings(input_ids=tokens[:, None], position_ids=position.view(1, 1))  # [N, 1, D]
        length = cache[0][0].shape[2]
        visible = (torch.arange(length, device=tokens.device) <= position).view(1, 1, 1, length)  # [1, 1, 1, L]
        for layer, image_kv, (keys, values) in zip(self.layers, cross, cache):
            attention = layer.attention.self
            q, k, v = (split_heads(proj(hidden), self.heads)
                       for proj in (attention.query, attention.key, attention.value))  # [N, H, 1, d]
            keys.index_copy_(2, position.view(1), k)
            values.index_copy_(2, position.view(1), v)
            context = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)  # [N, H, 1, d]
            hidden = self._finish_layer(layer, hidden, context, image_kv)
        return self.head(hidden[:, 0])  # [N, V]


def process_logits(logits: torch.Tensor, seen: torch.Tensor, new_tokens: int, settings: DecodeSettings) -> torch.Tensor:
    """generate's logits processors: repetition penalty on `seen` tokens [N, V], then min length."""
    penalty = settings.repetition_penalty
    if penalty != 1.0:
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if new_tokens < settings.min_new_tokens:
        logits[:, settings.eos_token_id] = -float("inf")
    return logits


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait (pinned, non-blocking) on CUDA."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def worth_compacting(done: int, kept: int, steps_left: int) -> bool:
    """Drop finished images when the rows saved over the remaining steps outweigh the copy.

    A step reads every active image's cross-attention keys/values once; compaction reads and
    writes the kept ones once, about two steps' worth of the kept rows.
    """
    return done > 0 and done * steps_left > 2 * kept


@torch.no_grad()
def decode_captions(decoder: StaticDecoder, image_embeds: torch.Tensor, prompt_ids: torch.Tensor,
                    captions: int, choose: Chooser, uniforms: torch.Tensor, settings: DecodeSettings,
                    step: Callable | None = None) -> torch.Tensor:
    """image_embeds [B, P, D], prompt_ids [T0] -> new token ids [B * K, <= max_new_tokens].

    `uniforms` [B * K, max_new_tokens] (CPU or device) feed the chooser, one per row and step.
    After a row's end-of-sequence it holds `pad_token_id`; the width is the steps run. `step`
    replaces `decoder.step` (a compiled copy of it).
    """
    step = step or decoder.step
    images, device = image_embeds.shape[0], image_embeds.device
    t0 = prompt_ids.shape[0]
    length = t0 + settings.max_new_tokens
    if length > decoder.max_positions:
        raise ValueError(f"run.caption.max_length: the prompt ({t0} tokens) + {settings.max_new_tokens} new tokens "
                         f"exceed the decoder's {decoder.max_positions} positions")
    prompt_ids = upload(prompt_ids, device)
    cross = decoder.project_image(image_embeds)  # [(k, v)] x layers, [B, H, P, d]
    cache = decoder.empty_cache(images * captions, length, image_embeds)  # [(k, v)] x layers, [N, H, L, d]
    first = decoder.prefill(prompt_ids, cross, cache, captions)  # [B, V]
    logits = first[:, None].expand(-1, captions, -1).flatten(0, 1)  # [N, V]

    rows = torch.arange(images * captions, device=device)  # each active row's index in the output
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # [N, V] tokens in the sequence
    seen[:, prompt_ids] = True
    finished = torch.zeros(rows.shape, dtype=torch.bool, device=device)  # [N]
    uniforms = upload(uniforms, device)  # [N, max_new_tokens]: the one upload of random numbers
    out = torch.full((images * captions, settings.max_new_tokens), settings.pad_token_id, device=device)
    position = torch.full((), t0, device=device)  # where the next token sits
    for t in range(settings.max_new_tokens):
        if t > 0:
            logits = step(tokens, position, cross, cache)  # [N, V]  # noqa: F821 - tokens is bound at t = 0
            position += 1
        tokens = choose(process_logits(logits.float(), seen, t, settings), uniforms[:, t])  # [N]
        tokens = torch.where(finished, settings.pad_token_id, tokens)
        finished |= tokens == settings.eos_token_id
        seen.scatter_(1, tokens[:, None], True)
        out[rows, t] = tokens
        if (t + 1) % settings.check_every and t + 1 < settings.max_new_tokens:
            continue
        image_done = finished.view(-1, captions).all(dim=1).tolist()  # the host sync, once per check
        if all(image_done):
            break
        kept_images = [i for i, done in enumerate(image_done) if not done]
        if worth_compacting(len(image_done) - len(kept_images), len(kept_images), settings.max_new_tokens - t - 1):
            kept = upload(torch.tensor(kept_images), device)  # [G']
            kept_rows = (kept[:, None] * captions + torch.arange(captions, device=device)).flatten()  # [G' * K]
            cross = [(k.index_select(0, kept), v.index_select(0, kept)) for k, v in cross]
            cache = [(k.index_select(0, kept_rows), v.index_select(0, kept_rows)) for k, v in cache]
            rows, seen, finished, uniforms, tokens = (x.index_select(0, kept_rows)
                                                      for x in (rows, seen, finished, uniforms, tokens))
    return out[:, : t + 1]
