"""Fused attention for loaded transformers BLIP models: `use_sdpa(model)`.

transformers' BLIP has no `attn_implementation="sdpa"` (from_pretrained refuses it), so both of
its towers compute attention eagerly: a score matrix, a softmax, a second matmul, each through
memory. `use_sdpa` swaps the class of every attention module of a loaded model in place, keeping
its weights and everything around it, so that the same projections feed
`torch.nn.functional.scaled_dot_product_attention` (a fused kernel on CPU and GPU):

- `BlipAttention` (vision tower, one fused qkv projection, no mask);
- `BlipTextSelfAttention` (text tower: self- and cross-attention, encoder and decoder), with the
  additive masks transformers builds for eager attention and its KV cache, as stock does.

Semantics are stock's, including one quirk: transformers' BlipTextAttention never hands the
cross-attention its `encoder_attention_mask`, so image tokens are never masked (BLIP's images
have no padding, so this never matters for BLIP). The swapped modules return no attention maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


class SdpaBlipAttention(BlipAttention):
    """The vision tower's attention through one fused kernel."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        bsz, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(bsz, tokens, 3, self.num_heads, self.head_dim)  # [B, T, 3, H, d]
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, d]
        context = F.scaled_dot_product_attention(query, key, value, scale=self.scale,
                                                 dropout_p=self.dropout.p if self.training else 0.0)  # [B, H, T, d]
        return self.projection(context.transpose(1, 2).reshape(bsz, tokens, width)), None


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """The text tower's self- or cross-attention through one fused kernel, cache handling as stock."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values  # the name differs across transformers 5.x
        heads = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(heads).transpose(1, 2)  # [B, H, T, d]
        is_cross = encoder_hidden_states is not None
        attention_mask = encoder_attention_mask if is_cross else attention_mask  # stock's rule (see above)

        layer_cache, reuse = cache, False
        if isinstance(cache, EncoderDecoderCache):
            reuse = is_cross and bool(cache.is_updated.get(self.layer_idx))
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if reuse:  # cross-attention K/V were projected on the first step
            key, value = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        else:
            source = encoder_hidden_states if is_cross else hidden_states
            kv_heads = (*source.shape[:-1], -1, self.attention_head_size)
            key = self.key(source).view(kv_heads).transpose(1, 2)  # [B, H, S, d]
            value = self.value(source).view(kv_heads).transpose(1, 2)  # [B, H, S, d]
            if cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        mask = None if attention_mask is None else attention_mask.to(query.device, query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 dropout_p=self.dropout.p if self.training else 0.0)  # [B, H, T, d]
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)  # [B, T, D]
        return context, None


SWAPS = {BlipAttention: SdpaBlipAttention, BlipTextSelfAttention: SdpaBlipTextSelfAttention}


def use_sdpa(model: torch.nn.Module) -> int:
    """Swap every BLIP attention module of `model` to its SDPA class, in place. -> modules swapped."""
    swapped = 0
    for module in model.modules():
        fused = SWAPS.get(type(module))
        if fused is not None:
            module.__class__ = fused
            swapped += 1
    return swapped
