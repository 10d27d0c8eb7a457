"""The static-buffer caption decoder: sampling as transformers filters, host syncs, compaction."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BlipForConditionalGeneration
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from capfilt.model import caption_decode
from capfilt.model.caption_decode import (DecodeSettings, StaticDecoder, decode_captions, nucleus,
                                          process_logits)
from tests.host_syncs import HostSyncs
from tests.tiny_blip import IMAGE_SIZE, blip_config, greedy, sharpen_attention, stop_early

PROMPT = torch.tensor([30522, 1037, 3861])  # [DEC] a picture


def settings(**changes) -> DecodeSettings:
    base = dict(min_new_tokens=2, max_new_tokens=8, repetition_penalty=1.1, eos_token_id=102, pad_token_id=0,
                check_every=4)
    return DecodeSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def models():
    """Stock (eager) tiny captioners: "random" never ends a caption, "early" ends images apart."""
    out = {}
    for name in ("random", "early"):
        torch.manual_seed(0)
        out[name] = BlipForConditionalGeneration(blip_config()).eval()
    stop_early(out["early"])
    return out


def image_embeds(model, n: int = 6) -> torch.Tensor:
    pixels = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels).last_hidden_state  # [n, P, D]


def reference_sample(logits: torch.Tensor, u: float, top_k: int, top_p: float) -> int:
    """transformers' own warpers (top-k, then top-p), then inverse-CDF over the kept tokens by rank."""
    scores = logits[None].clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    probs = TopPLogitsWarper(top_p)(None, scores)[0].softmax(-1)
    ranked, order = probs.sort(descending=True)
    index = int(torch.searchsorted(ranked.cumsum(0), torch.tensor(u * float(ranked.sum()))))
    return int(order[min(index, int((ranked > 0).sum()) - 1)])


@pytest.mark.parametrize("top_k", [50, 0])
@pytest.mark.parametrize("peaked", [True, False])
def test_nucleus_samples_as_transformers_filters(top_k, peaked):
    vocab = 30524
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=generator) * (1.0 if peaked else 0.1)
    if peaked:  # a trained model's shape: a few likely tokens (cumulative 0.46, 0.74, 0.91, ...)
        logits[:5] = torch.tensor([16.0, 15.5, 15.0, 14.0, 13.0])
    n = 300
    uniforms = torch.rand(n, generator=generator)
    chosen = nucleus(0.9, top_k)(logits.expand(n, -1), uniforms)  # [n]
    assert chosen.tolist() == [reference_sample(logits, float(u), top_k, 0.9) for u in uniforms]
    if peaked:
        assert set(chosen.tolist()) == {0, 1, 2}  # the nucleus: the smallest prefix holding 0.9
        probs = logits.softmax(-1)
        frequencies = torch.bincount(chosen, minlength=3).float() / n
        assert frequencies.tolist() == pytest.approx((probs[:3] / probs[:3].sum()).tolist(), abs=0.08)
    else:  # a flat distribution: top-k alone bounds the choice
        distinct = len(set(chosen.tolist()))
        assert distinct <= 50 if top_k else distinct > 250


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_host_syncs_once_per_check_not_per_step(models, check_every):
    model = models["random"]  # never ends a caption: all 8 steps run
    embeds = image_embeds(model)
    uniforms = torch.rand(12, 8)
    with HostSyncs() as syncs:
        ids = decode_captions(StaticDecoder(model.text_decoder), embeds, PROMPT, 2, nucleus(0.9, 50), uniforms,
                              settings(check_every=check_every))
    assert ids.shape == (12, 8)
    assert syncs.seen == ["tolist"] * math.ceil(8 / check_every)  # one read per check, none per step


def test_the_sync_counter_sees_stock_generates_syncs(models):
    model = models["random"]
    prompt = PROMPT.expand(6, -1)
    with HostSyncs() as syncs, torch.no_grad():
        model.text_decoder.generate(input_ids=prompt, encoder_hidden_states=image_embeds(model), do_sample=False,
                                    max_new_tokens=8, min_new_tokens=2, eos_token_id=102, pad_token_id=0)
    assert syncs.count >= 8  # at least one per step (its stopping check)


def test_compacting_finished_images_changes_no_caption(monkeypatch):
    torch.manual_seed(0)  # a likelier end than "early": sampled captions end too, at many steps
    model = stop_early(BlipForConditionalGeneration(blip_config()).eval(), eos_boost=3.3)
    embeds = image_embeds(model, 8)
    uniforms = torch.rand(24, 10, generator=torch.Generator().manual_seed(1))
    run = dict(captions=3, choose=nucleus(0.9, 50), uniforms=uniforms, settings=settings(max_new_tokens=10,
                                                                                         check_every=2))
    decisions = []

    def forced(answer):
        def decide(done, kept, steps_left):
            decisions.append((done, answer))
            return done > 0 and answer
        return decide

    monkeypatch.setattr(caption_decode, "worth_compacting", forced(False))
    kept_whole = decode_captions(StaticDecoder(model.text_decoder), embeds, PROMPT, **run)
    monkeypatch.setattr(caption_decode, "worth_compacting", forced(True))
    compacted = decode_captions(StaticDecoder(model.text_decoder), embeds, PROMPT, **run)
    assert torch.equal(compacted, kept_whole)
    assert any(done > 0 and answer for done, answer in decisions)  # some images did leave the batch
    ends = {tuple((row == 102).nonzero().flatten()[:1].tolist()) for row in kept_whole}
    assert len(ends) > 3 and () in ends  # captions ended at several steps, some never


def test_compaction_pays_when_rows_saved_outweigh_the_copy():
    assert not caption_decode.worth_compacting(0, 10, 20)
    assert not caption_decode.worth_compacting(1, 511, 16)  # 1 image of 512: the copy costs more
    assert caption_decode.worth_compacting(100, 412, 16)


def test_greedy_equals_generate_per_row_with_penalty_and_min_length(models):
    model = models["early"]
    embeds = image_embeds(model)
    s = settings(max_new_tokens=10, min_new_tokens=3, check_every=2)
    with torch.no_grad():
        want = model.text_decoder.generate(input_ids=PROMPT.expand(6, -1), encoder_hidden_states=embeds,
                                           do_sample=False, max_new_tokens=10, min_new_tokens=3,
                                           repetition_penalty=1.1, eos_token_id=102, pad_token_id=0)[:, 3:]
    got = decode_captions(StaticDecoder(model.text_decoder), embeds, PROMPT, 1, greedy, torch.zeros(6, 10), s)
    assert torch.equal(got[:, : want.shape[1]], want)
    assert not bool((want[:, :3] == 102).any())  # min length held


def test_greedy_equals_generate_when_the_image_is_narrower_than_the_text():
    """BLIP's small/large shapes: a ViT narrower than the text tower (demo: 192 vs 384); the caches
    take the text tower's width."""
    from transformers import BlipConfig

    cfg = blip_config().to_dict()
    cfg["vision_config"]["hidden_size"] = 16
    torch.manual_seed(0)
    model = stop_early(BlipForConditionalGeneration(BlipConfig(**{k: cfg[k] for k in (
        "vision_config", "text_config", "image_text_hidden_size")})).eval())
    embeds = image_embeds(model)  # [6, P, 16]
    s = settings(max_new_tokens=6, check_every=2)
    with torch.no_grad():
        want = model.text_decoder.generate(input_ids=PROMPT.expand(6, -1), encoder_hidden_states=embeds,
                                           do_sample=False, max_new_tokens=6, min_new_tokens=2,
                                           repetition_penalty=1.1, eos_token_id=102, pad_token_id=0)[:, 3:]
    got = decode_captions(StaticDecoder(model.text_decoder), embeds, PROMPT, 1, greedy, torch.zeros(6, 6), s)
    assert embeds.shape[-1] == 16 and model.text_decoder.config.hidden_size == 32
    assert torch.equal(got[:, : want.shape[1]], want)


def test_decoder_steps_equal_stock_forward_logits():
    """Prefill once per image, then K rows per image stepping through different tokens, against
    stock's full forward of each row's sequence (the image embeddings repeated per row)."""
    torch.manual_seed(0)
    model = sharpen_attention(BlipForConditionalGeneration(blip_config()).eval())
    embeds = image_embeds(model, 3)  # [3, P, D]
    k, steps = 2, 5
    tail = torch.randint(1000, 3000, (3 * k, steps), generator=torch.Generator().manual_seed(2))
    sequences = torch.cat([PROMPT.expand(3 * k, -1), tail], dim=1)  # [6, T0 + 5], rows of an image differ
    with torch.no_grad():
        want = model.text_decoder(input_ids=sequences, encoder_hidden_states=embeds.repeat_interleave(k, 0),
                                  use_cache=False).logits  # [6, T, V]
        decoder = StaticDecoder(model.text_decoder)
        cross = decoder.project_image(embeds)
        cache = decoder.empty_cache(3 * k, len(PROMPT) + steps, embeds)
        got = [decoder.prefill(PROMPT, cross, cache, k).repeat_interleave(k, 0)]  # [6, V]
        for t in range(steps - 1):
            position = torch.tensor(len(PROMPT) + t)
            got.append(decoder.step(tail[:, t], position, cross, cache))
    got = torch.stack(got, dim=1)  # [6, steps, V]
    torch.testing.assert_close(got, want[:, len(PROMPT) - 1 : -1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # the test's premise: the rows of an image differ


@pytest.mark.parametrize("new_tokens", [1, 4])
def test_logits_processing_matches_transformers_processors(new_tokens):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=generator) * 3
    sequences = torch.randint(0, 200, (4, 3 + new_tokens), generator=generator)  # prompt of 3 + new tokens
    seen = torch.zeros(4, 200, dtype=torch.bool).scatter_(1, sequences, True)
    s = settings(min_new_tokens=3, eos_token_id=7)
    want = MinNewTokensLengthLogitsProcessor(3, 3, 7)(sequences, RepetitionPenaltyLogitsProcessor(1.1)(
        sequences, logits.clone()))
    torch.testing.assert_close(process_logits(logits.clone(), seen, new_tokens, s), want, rtol=0, atol=0)
