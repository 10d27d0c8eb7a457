"""Attention pieces of BLIP's text tower that the caption decoder and the scoring pass share.

Both run a loaded transformers `BlipTextModel`'s layers with their own modules (Linear,
LayerNorm), not through `forward`, so that the cross-attention keys/values of an image are
projected once for every text (or caption) that attends to it:

- `project_image`: every layer's cross-attention K/V of B images, [B, H, P, d] each;
- `cross_attend`: K consecutive query rows per image against that image's K/V, as K * T queries
  of one SDPA call (grouped queries: nothing is copied per text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)  # [R, T, D] -> [R, H, T, d]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # [R, H, T, d] -> [R, T, D]


def project_image(layers, heads: int, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's cross-attention keys and values, once per image: [(k, v)], each [B, H, P, d]."""
    out = []
    for layer in layers:
        attention = layer.crossattention.self
        out.append((split_heads(attention.key(image_embeds), heads),
                    split_heads(attention.value(image_embeds), heads)))
    return out


def cross_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """query [G * K, H, T, d] (K consecutive rows per image), key/value [G, H, P, d] -> [G * K, H, T, d].

    Cross-attention has no mask between the texts of one image, so its K rows are K * T
    queries against the image's keys/values: no copy of them per text.
    """
    rows, heads, tokens, width = query.shape
    groups = key.shape[0]
    grouped = query.view(groups, rows // groups, heads, tokens, width).transpose(1, 2)  # [G, H, K, T, d]
    out = F.scaled_dot_product_attention(grouped.reshape(groups, heads, -1, width), key, value)  # [G, H, K*T, d]
    return out.view(groups, heads, rows // groups, tokens, width).transpose(1, 2).reshape(query.shape)
