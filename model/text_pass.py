"""ITM and ITC of many texts in one pass over BLIP's text encoder (inference; `blip_ops` calls it).

BLIP scores a text twice with the same `BlipTextModel`: unimodal ([CLS] first, no image) for ITC
and image-grounded ([ENC] first, cross-attention to the image) for ITM. The two share every weight
except cross-attention, and the first token changes every hidden state (attention is
bidirectional), so no activation can be shared between them. What this pass fuses instead:

- **one pass for both**: the unimodal and the grounded copy of a text (same length) are rows of
  one batch through the embeddings, each layer's self-attention and its feed-forward (one matmul
  per weight for both); cross-attention runs on the grounded rows only;
- **cross-attention K/V once per image**: every layer's keys/values of an image are projected
  once (`text_attention.project_image`) and read by all of its texts as grouped queries
  (`cross_attend`), where stock repeats the image embeddings per text and projects them again;
- **texts bucketed by length**: texts whose token counts round up to the same multiple of
  `bucket_tokens` run together, padded to the longest of their bucket (stock pads every text to
  the longest of the batch: the long web captions made the short synthetic ones pay for them);
- **the last layer on the first token only**: ITM and ITC read token 0, so the last layer's
  queries, outputs and feed-forward run for it alone (its keys/values still cover every token).

Padding never changes a real token's value (padded keys are masked out, padded queries are
dropped), so the scores are stock's up to floating-point summation order
(tests/model/test_blip_ops.py compares them with stock transformers). The buckets, and inside
them the order of texts (by image, then position), follow from the texts and their owners alone,
so a model batch is always cut the same way.

Shapes: N texts, T tokens, B images, P image tokens, D width, H heads, d = D / H; in a bucket,
n texts of G images, at most C texts per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text_attention import cross_attend, merge_heads, project_image, split_heads
from .transfer import upload

# Tokens per length bucket: texts padded to at most this many tokens beyond their own length
# rounded up (BLIP's 35-token texts fall in at most 5 buckets); 0 pads all to the longest.
BUCKET_TOKENS = 8


@dataclass(frozen=True)
class Bucket:
    """Texts run together: padded to `length`, their cross-attention laid out as a [G, C] grid."""

    texts: list[int]  # indices into the batch's texts, ordered by image then position
    length: int  # tokens per row: the bucket's longest text
    images: list[int] | None  # the G images (indices into the projected K/V) when not all of them
    slots: list[int] | None  # each text's slot g * C + rank in the grid when the texts do not fill it in order
    per_image: int  # C


def plan_buckets(lengths: Sequence[int], owner: Sequence[int] | None, images: int,
                 bucket_tokens: int) -> list[Bucket]:
    """The buckets of texts with these token counts, text n of image owner[n] (None: no image).

    `bucket_tokens` 0 puts every text in one bucket (stock's padding to the longest).
    """
    def key(n: int) -> int:
        return -(-lengths[n] // bucket_tokens) if bucket_tokens else 0

    groups: dict[int, list[int]] = {}
    for n in range(len(lengths)):
        groups.setdefault(key(n), []).append(n)
    out = []
    for _, texts in sorted(groups.items()):
        length = max(lengths[n] for n in texts)
        if owner is None:
            out.append(Bucket(texts, length, None, None, 1))
            continue
        texts = sorted(texts, key=lambda n: (owner[n], n))
        present = sorted({owner[n] for n in texts})
        where = {image: g for g, image in enumerate(present)}
        counts = [0] * len(present)
        ranks = []
        for n in texts:
            g = where[owner[n]]
            ranks.append((g, counts[g]))
            counts[g] += 1
        per_image = max(counts)
        dense = all(c == per_image for c in counts)
        out.append(Bucket(texts, length, None if present == list(range(images)) else present,
                          None if dense else [g * per_image + r for g, r in ranks], per_image))
    return out


class TextPass:
    """A loaded `BlipTextModel` (with cross-attention layers) run over buckets of texts."""

    def __init__(self, text_encoder: nn.Module):
        self.embeddings = text_encoder.embeddings
        self.layers = text_encoder.encoder.layer
        self.heads = text_encoder.config.num_attention_heads
        self.device = self.embeddings.word_embeddings.weight.device

    def _grid_attend(self, bucket: Bucket, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     images: torch.Tensor | None, slots: torch.Tensor | None) -> torch.Tensor:
        """query [n, H, T, d] of the bucket's texts against their own image's key/value [B, H, P, d]."""
        if images is not None:  # the bucket's texts come from G < B images
            key, value = key.index_select(0, images), value.index_select(0, images)  # [G, H, P, d]
        if slots is None:  # every image holds C texts, in order: the texts are the grid
            return cross_attend(query, key, value)
        grid = query.new_zeros((key.shape[0] * bucket.per_image, *query.shape[1:]))  # [G * C, H, T, d]
        grid.index_copy_(0, slots, query)  # empty slots stay zero queries, their output unread
        return cross_attend(grid, key, value).index_select(0, slots)  # [n, H, T, d]

    def _bucket(self, bucket: Bucket, rows: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                unimodal: bool, cross: list | None,
                enc_token_id: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The bucket's texts (`rows` [n]) through every layer -> (unimodal, grounded) first-token states, [n, D]."""
        ids = input_ids.index_select(0, rows)[:, : bucket.length]  # [n, T]
        visible = mask.index_select(0, rows)[:, : bucket.length].bool()  # [n, T]
        parts = [ids] if unimodal else []
        if cross is not None:
            grounded_ids = ids.clone()
            grounded_ids[:, 0] = enc_token_id  # [ENC] first
            parts.append(grounded_ids)
        split = ids.shape[0] if unimodal else 0  # rows [0, split) unimodal, [split, R) grounded
        hidden = self.embeddings(input_ids=torch.cat(parts))  # [R, T, D]
        visible = visible.repeat(len(parts), 1)[:, None, None, :]  # [R, 1, 1, T] keys a row may attend
        images = slots = None
        if cross is not None:
            images = None if bucket.images is None else upload(torch.tensor(bucket.images), self.device)  # [G]
            slots = None if bucket.slots is None else upload(torch.tensor(bucket.slots), self.device)  # [n]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            queries = hidden[:, :1] if i == last else hidden  # [R, T or 1, D]: the scores read token 0
            attention = layer.attention.self
            context = F.scaled_dot_product_attention(
                split_heads(attention.query(queries), self.heads), split_heads(attention.key(hidden), self.heads),
                split_heads(attention.value(hidden), self.heads), attn_mask=visible)  # [R, H, T', d]
            out = layer.attention.output(merge_heads(context), queries)  # [R, T', D]
            if cross is not None:
                grounded = out[split:]  # [n, T', D]
                query = split_heads(layer.crossattention.self.query(grounded), self.heads)  # [n, H, T', d]
                attended = self._grid_attend(bucket, query, *cross[i], images, slots)  # [n, H, T', d]
                out[split:] = layer.crossattention.output(merge_heads(attended), grounded)
            hidden = layer.feed_forward_chunk(out)  # [R, T', D]
        first = hidden[:, 0]  # [R, D]
        return (first[:split] if unimodal else None), (first[split:] if cross is not None else None)

    @torch.no_grad()
    def first_states(self, input_ids: torch.Tensor, mask: torch.Tensor, *, unimodal: bool = True,
                     image_embeds: torch.Tensor | None = None, owner: Sequence[int] | None = None,
                     enc_token_id: int | None = None,
                     bucket_tokens: int = BUCKET_TOKENS) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids [N, T] ([CLS] first) -> (unimodal [N, D] or None, grounded [N, D] or None) at token 0.

        Grounded states need `image_embeds` [B, P, D], `owner` (text n's image: host ints or a
        tensor) and `enc_token_id`. Host ids and mask (as `blip_ops.tokenize` gives them by
        default) cost no device sync: the buckets are planned from the mask's row sums on the
        host, then both are uploaded once.
        """
        if bucket_tokens < 0:
            raise ValueError(f"bucket_tokens must be at least 0, got {bucket_tokens}")
        lengths = mask.sum(dim=1).tolist()  # [N] host ints (one sync if the mask is on a GPU)
        input_ids, mask = upload(input_ids, self.device), upload(mask, self.device)  # [N, T]
        cross = None
        if image_embeds is not None:
            owner = owner.tolist() if isinstance(owner, torch.Tensor) else [int(o) for o in owner]
            used = sorted(set(owner))
            if used != list(range(image_embeds.shape[0])):  # project only the images some text refers to
                image_embeds = image_embeds.index_select(0, upload(torch.tensor(used, dtype=torch.long),
                                                                   image_embeds.device))  # [B', P, D]
                local = {image: i for i, image in enumerate(used)}
                owner = [local[o] for o in owner]
            cross = project_image(self.layers, self.heads, image_embeds)  # [(k, v)] x layers, [B', H, P, d]
        buckets = plan_buckets(lengths, owner if cross is not None else None,
                               0 if cross is None else cross[0][0].shape[0], bucket_tokens)
        weight = self.embeddings.word_embeddings.weight  # [V, D]
        uni = weight.new_empty(len(lengths), weight.shape[1]) if unimodal else None  # [N, D]
        grounded = weight.new_empty(len(lengths), weight.shape[1]) if cross is not None else None  # [N, D]
        for bucket in buckets:
            rows = upload(torch.tensor(bucket.texts, dtype=torch.long), self.device)  # [n]
            u, g = self._bucket(bucket, rows, input_ids, mask, unimodal, cross, enc_token_id)
            if u is not None:
                uni.index_copy_(0, rows, u)
            if g is not None:
                grounded.index_copy_(0, rows, g)
        return uni, grounded
