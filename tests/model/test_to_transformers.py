"""Export to stock transformers BLIP: the exported models reproduce MED's captions and scores."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoProcessor, AutoTokenizer, BlipForConditionalGeneration,
                          BlipForImageTextRetrieval)

from capfilt.model import blip_ops
from capfilt.model.to_transformers import export_captioner, export_filter
from capfilt.model.med import MED, med_config
from capfilt.model.tokenizer import build_tokenizer
from tests.tiny_blip import med_greedy_ids, med_scores

PROMPT = "a picture of "
TEXT_LEN = 16  # tokens per test text, [CLS] and [SEP] included
TEXTS = ["a red circle on the left", "a blue square", "two green triangles at the top of a yellow background",
         "x", "a large red star", "a small blue circle on the right"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def med():
    """A tiny MED whose outputs depend on the image, with some captions ending early."""
    torch.manual_seed(0)
    cfg = med_config("tiny", image_size=32, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=2,
                     vision_mlp=128, text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128,
                     embed_dim=32, queue_size=32)
    model = MED(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # random init is too flat: every image gets one caption
        model.text_decoder.cls.predictions.bias[cfg.sep_token_id] += 9.0  # some captions stop early
    return model.eval()


@pytest.fixture(scope="module")
def exported(med, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    export_captioner(med, tokenizer, root / "captioner")
    export_filter(med, tokenizer, root / "filter")
    return root


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_exported_directories_are_plain_safetensors_blip(exported, med):
    for name, arch in (("captioner", "BlipForConditionalGeneration"), ("filter", "BlipForImageTextRetrieval")):
        directory = exported / name
        files = {p.name for p in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json"} <= files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == [arch] and config["text_config"]["vocab_size"] == 30524
        tok = AutoTokenizer.from_pretrained(directory)
        assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523] and tok.bos_token == "[DEC]"
        image_processor = AutoImageProcessor.from_pretrained(directory)
        assert (image_processor.size["height"], image_processor.size["width"]) == (32, 32)
        assert tuple(image_processor.image_mean) == pytest.approx(med.cfg.image_mean)
        assert tuple(image_processor.image_std) == pytest.approx(med.cfg.image_std)
        processor = AutoProcessor.from_pretrained(directory)
        out = processor(images=Image.new("RGB", (50, 40), (200, 10, 10)), text="a red image", return_tensors="pt")
        assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_captioner_generates_the_same_tokens_as_med(exported, med, tokenizer, pixels):
    hf = BlipForConditionalGeneration.from_pretrained(exported / "captioner").eval()
    # What BlipProcessor gives for the prompt: [CLS] a picture of [SEP]; generate swaps in [DEC] and drops [SEP].
    prompt = tokenizer([PROMPT] * len(pixels), return_tensors="pt")
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    for max_new, min_new in ((8, 2), (10, 5)):
        with torch.no_grad():
            hf_out = hf.generate(pixel_values=pixels, input_ids=prompt.input_ids.clone(),
                                 attention_mask=prompt.attention_mask, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new, min_new_tokens=min_new)
        hf_new = hf_out[:, prompt.input_ids.shape[1] - 1:]  # after [DEC] + prompt ([SEP] was dropped)
        med_new = med_greedy_ids(med, pixels, prompt_ids, max_new, min_new)
        assert torch.equal(hf_new, med_new), (hf_new, med_new)
        hf_text = [t.strip() for t in tokenizer.batch_decode(hf_new, skip_special_tokens=True)]
        # not a degenerate comparison: captions depend on the image, and [SEP] stops some of them
        assert len(set(hf_text)) > 1
        assert (med_new == tokenizer.sep_token_id).any()
        assert not (med_new[:, :min_new] == tokenizer.sep_token_id).any()


def test_filter_gives_the_same_itm_and_itc_as_med(exported, med, tokenizer, pixels):
    hf = BlipForImageTextRetrieval.from_pretrained(exported / "filter").eval()
    enc = tokenizer(TEXTS, padding="max_length", max_length=TEXT_LEN, truncation=True,
                    return_tensors="pt")
    scores = med_scores(med, pixels, enc.input_ids, enc.attention_mask)
    enc_first = enc.input_ids.clone()
    enc_first[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        itm = hf(input_ids=enc_first, pixel_values=pixels, attention_mask=enc.attention_mask).itm_score.softmax(-1)
        itc = hf(input_ids=enc.input_ids, pixel_values=pixels, attention_mask=enc.attention_mask,
                 use_itm_head=False).itm_score.diagonal()
        cls_itm = hf(input_ids=enc.input_ids, pixel_values=pixels,
                     attention_mask=enc.attention_mask).itm_score.softmax(-1)[:, 1]
    torch.testing.assert_close(itm[:, 1], scores["itm"], atol=1e-4, rtol=0)
    torch.testing.assert_close(itc, scores["itc"], atol=1e-4, rtol=0)
    assert scores["itm"].std() > 1e-3 and scores["itc"].std() > 1e-3
    # The first token matters: [CLS]-first ITM (the stock processor's input) is a different score.
    assert not torch.allclose(cls_itm, scores["itm"], atol=1e-3)
    # Retrieval features (blip_ops on MED's own modules) agree with the exported projections too.
    towers = blip_ops.Towers.of(med)
    _, image_feat = blip_ops.image_side(towers, pixels)
    torch.testing.assert_close(image_feat @ blip_ops.text_features(towers, enc.input_ids, enc.attention_mask).T,
                               hf(input_ids=enc.input_ids, pixel_values=pixels, attention_mask=enc.attention_mask,
                                  use_itm_head=False).itm_score.detach(), atol=1e-4, rtol=0)


def test_from_blip_rebuilds_the_same_model(exported, med, tokenizer, pixels):
    rebuilt = MED.from_blip(exported / "captioner", exported / "filter", queue_size=med.cfg.queue_size).eval()
    architecture = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "vision_mlp",
                    "text_hidden", "text_layers", "text_heads", "text_intermediate", "embed_dim", "vocab_size",
                    "dec_token_id", "sep_token_id", "pad_token_id")
    assert {k: getattr(rebuilt.cfg, k) for k in architecture} == {k: getattr(med.cfg, k) for k in architecture}
    enc = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    a, b = (med_scores(model, pixels, enc.input_ids, enc.attention_mask) for model in (med, rebuilt))
    torch.testing.assert_close(a["itm"], b["itm"], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["itc"], b["itc"], atol=1e-6, rtol=0)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(med_greedy_ids(med, pixels, prompt_ids, 8, 2), med_greedy_ids(rebuilt, pixels, prompt_ids, 8, 2))
    for param, param_m in rebuilt._momentum_pairs():
        assert torch.equal(param, param_m)
    assert (rebuilt.text_decoder.bert.encoder.layer[0].intermediate
            is rebuilt.text_encoder.encoder.layer[0].intermediate)
