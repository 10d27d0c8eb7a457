"""`use_sdpa` swaps BLIP's attention to fused SDPA: outputs equal stock eager on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.model.sdpa import SdpaBlipAttention, SdpaBlipTextSelfAttention, use_sdpa
from tests.tiny_blip import IMAGE_SIZE, blip_config, sharpen_attention

FP32 = dict(rtol=1e-4, atol=1e-5)
# bf16 keeps 8 bits of mantissa: two kernels that sum in different orders differ by a few ulps
# of the largest activations (LayerNorm keeps them O(1)).
BF16 = dict(rtol=0.05, atol=0.05)


def pair(cls, dtype=torch.float32, device="cpu"):
    """(stock eager model, the same weights with SDPA attention); attention sharpened so mistakes show."""
    torch.manual_seed(0)
    stock = sharpen_attention(cls(blip_config()).eval()).to(device, dtype)
    return stock, use_sdpa_copy(stock)


def use_sdpa_copy(model):
    fused = copy.deepcopy(model)
    use_sdpa(fused)
    return fused


def inputs(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device, dtype)
    ids = torch.randint(1000, 2000, (3, 7), generator=g).to(device)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], device=device)  # padded rows
    return pixels, ids, mask


def test_every_attention_module_is_swapped():
    _, fused = pair(BlipForConditionalGeneration)
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(SdpaBlipAttention) == 2  # 2 vision layers
    assert kinds.count(SdpaBlipTextSelfAttention) == 4  # 2 decoder layers x (self + cross)
    assert use_sdpa(fused) == 0  # already swapped: nothing left


def test_vision_tower_equals_stock():
    stock, fused = pair(BlipForConditionalGeneration)
    pixels, _, _ = inputs()
    with torch.no_grad():
        want = stock.vision_model(pixel_values=pixels).last_hidden_state
        got = fused.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want, **FP32)


def test_filter_itm_and_itc_with_padded_texts_equal_stock():
    stock, fused = pair(BlipForImageTextRetrieval)
    pixels, ids, mask = inputs()
    with torch.no_grad():
        for use_itm_head in (False, True):
            want = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=use_itm_head)
            got = fused(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=use_itm_head)
            torch.testing.assert_close(got.itm_score, want.itm_score, **FP32)
        # The padding mask matters (it reaches SDPA): without it the padded rows score otherwise.
        unmasked = fused(input_ids=ids, attention_mask=torch.ones_like(mask), pixel_values=pixels).itm_score
        assert not torch.allclose(unmasked[1:], want.itm_score[1:], **FP32)


def test_decoder_causal_padded_and_cross_attention_equal_stock():
    stock, fused = pair(BlipForConditionalGeneration)
    pixels, ids, mask = inputs()
    with torch.no_grad():
        embeds = stock.vision_model(pixel_values=pixels).last_hidden_state  # [3, P, D]
        image_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        image_mask[2, 5:] = 0  # a padded image: stock's cross-attention ignores it, so must ours
        for encoder_mask in (None, image_mask):
            kwargs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                          encoder_attention_mask=encoder_mask, use_cache=False)
            want = stock.text_decoder(**kwargs).logits
            got = fused.text_decoder(**kwargs).logits
            torch.testing.assert_close(got, want, **FP32)
        # The causal mask matters: a later token changes no earlier logit.
        changed = ids.clone()
        changed[:, -1] = 7
        later = fused.text_decoder(input_ids=changed, attention_mask=mask, encoder_hidden_states=embeds).logits
        torch.testing.assert_close(later[:, :-1], want[:, :-1], **FP32)
        assert not torch.allclose(later[0, -1], want[0, -1], **FP32)


def test_decoder_with_kv_cache_equals_stock_generate():
    stock, fused = pair(BlipForConditionalGeneration)
    pixels, _, _ = inputs()
    prompt = torch.tensor([[30522, 1037, 3861, 1997]] * 3)  # [DEC] a picture of
    settings = dict(do_sample=False, num_beams=1, min_new_tokens=2, max_new_tokens=6, repetition_penalty=1.1)
    with torch.no_grad():
        want = stock.generate(pixel_values=pixels, input_ids=prompt, **settings)
        got = fused.generate(pixel_values=pixels, input_ids=prompt, **settings)
        assert torch.equal(got, want)
        beams = dict(settings, num_beams=3, num_return_sequences=2)
        assert torch.equal(fused.generate(pixel_values=pixels, input_ids=prompt, **beams),
                           stock.generate(pixel_values=pixels, input_ids=prompt, **beams))
        # Step by step with the cache, the logits equal the full forward's.
        embeds = fused.vision_model(pixel_values=pixels).last_hidden_state
        full = stock.text_decoder(input_ids=want, encoder_hidden_states=embeds, use_cache=False).logits
        out = fused.text_decoder(input_ids=want[:, :4], encoder_hidden_states=embeds, use_cache=True)
        steps = [out.logits]
        for t in range(4, want.shape[1]):
            out = fused.text_decoder(input_ids=want[:, t : t + 1], encoder_hidden_states=embeds,
                                     cache=out.cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_within_the_stated_tolerance(device):
    stock, fused = pair(BlipForImageTextRetrieval, torch.bfloat16, device)
    pixels, ids, mask = inputs(device, torch.bfloat16)
    with torch.no_grad():
        want = stock.vision_model(pixel_values=pixels).last_hidden_state
        got = fused.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(got.float(), want.float(), **BF16)
        want = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
        got = fused(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
        torch.testing.assert_close(got.float(), want.float(), **BF16)
