"""`generate` captioners on tiny random BLIP-2 and InstructBLIP (OPT), LLaVA, LLaVA-NeXT, Idefics3 and
SmolVLM (Llama), Florence-2 (BART), PaliGemma (Gemma), Qwen2-VL and Qwen2.5-VL folders: greedy captions
token-identical to the family's own per-image `generate`, per-row seeded sampling that does not
depend on the batch, beam search, lengths, cleaning, and prompts that leave no image token.

Qwen2-VL, Qwen2.5-VL and SmolVLM processors carry a video processor that needs torchvision; the
captioner loads them without it (captioners.image_only). Where torchvision is installed, a test
checks that this gives the same inputs as the family's whole processor (docs/models.md)."""

from __future__ import annotations

from importlib.util import find_spec
from dataclasses import replace

import pytest
import torch

from capfilt.config import CaptionConfig
from capfilt.model.captioners import (NESTED_IMAGE_FAMILIES, VIDEO_PROCESSOR_FAMILIES, GenerateCaptioner,
                                      clean_caption)
from tests.model import tiny_models

CPU = torch.device("cpu")
# Sizes the processors resize differently (aspect ratios, smaller and larger than the model side).
SIZES = ((48, 40), (32, 64), (20, 20), (64, 48))
FAMILIES = tiny_models.CAPTIONERS
ALL = sorted(FAMILIES)
# Families whose pictures get different numbers of image tokens: the tests' batches are left-padded.
DYNAMIC = ("idefics3", "llava_next", "qwen2_vl", "qwen2_5_vl", "smolvlm")
OPTIONS = CaptionConfig(num_captions=3, min_length=2, max_length=8, repetition_penalty=1.1, seed=7)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {name: build(root / name) for name, (build, _) in FAMILIES.items()}


def prompt(family: str) -> str:
    return FAMILIES[family][1]


def captioner(folders, family: str, **options) -> GenerateCaptioner:
    return GenerateCaptioner(folders[family], replace(OPTIONS, prompt=prompt(family), **options), CPU)


@pytest.mark.parametrize("family", ALL)
def test_greedy_is_token_identical_to_per_image_generate(folders, family):
    model = captioner(folders, family)
    images = tiny_models.pictures(len(SIZES), sizes=SIZES)
    inputs = model.inputs(images)
    if family in DYNAMIC:
        assert not bool(inputs["attention_mask"].all())  # left padding is exercised
    batched = model.generate_ids(images, [str(i) for i in range(len(images))], greedy=True)  # [B, T]
    assert batched.shape[1] <= OPTIONS.max_length
    pad = model.model.generation_config.pad_token_id
    for row, image in zip(batched.tolist(), images):
        pictures = [[image]] if family in NESTED_IMAGE_FAMILIES else [image]  # its processor nests pictures per text
        inputs = model.processor(images=pictures, text=[model.text], return_tensors="pt")
        with torch.no_grad():
            out = model.model.generate(**inputs, do_sample=False, max_new_tokens=OPTIONS.max_length,
                                       min_new_tokens=OPTIONS.min_length,
                                       repetition_penalty=OPTIONS.repetition_penalty)
        start = 1 if model.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        own = out[0, start:].tolist()
        assert row[: len(own)] == own
        assert all(token == pad for token in row[len(own):])  # the batch ran longer for another row
    # The pictures are told apart (InstructBLIP's tiny Q-Former, its queries zero at init, barely
    # does: there the identity checks the batching and the prompt's slicing only).
    assert len({tuple(row) for row in batched.tolist()}) > (0 if family == "instructblip" else 1)


@pytest.mark.parametrize("family", ALL)
def test_sampled_captions_depend_on_the_row_key_not_the_batch(folders, family):
    model = captioner(folders, family)
    images = tiny_models.pictures(3, sizes=SIZES)
    keys = ["k0", "k1", "k2"]
    together = model.caption(images, keys)
    assert [len(c) for c in together] == [OPTIONS.num_captions] * 3
    alone = [model.caption([image], [key])[0] for image, key in zip(images, keys)]
    reordered = model.caption(images[::-1], keys[::-1])[::-1]
    assert together == alone == reordered
    assert len({c for captions in together for c in captions}) > 3  # the K draws of a row differ
    other_seed = GenerateCaptioner(folders[family], replace(OPTIONS, prompt=prompt(family), seed=8), CPU)
    assert other_seed.caption(images, keys) != together
    renamed = model.caption(images, ["x0", "x1", "x2"])
    assert renamed != together  # the key, not the position, seeds a row


def test_beam_search_gives_k_deterministic_captions(folders):
    model = captioner(folders, "llava", beam=True, num_beams=4)
    images = tiny_models.pictures(2, sizes=SIZES)
    first = model.caption(images, ["a", "b"])
    assert [len(c) for c in first] == [3, 3]
    assert model.caption(images, ["c", "d"]) == first  # keys do not matter to beam search
    assert model.generate_ids(images, ["a", "b"]).shape[0] == 2 * 3


def test_max_length_and_cleaning(folders):
    model = captioner(folders, "blip-2", max_length=3, min_length=3)
    ids = model.generate_ids(tiny_models.pictures(2), ["a", "b"])
    assert ids.shape == (2 * 3, 3)  # min = max: every row has exactly 3 new tokens
    assert all(len(c.split()) <= 3 for captions in model.caption(tiny_models.pictures(2), ["a", "b"])
               for c in captions)
    assert clean_caption("A Dog (on) the\nGRASS!\n\n") == "a dog on the grass"
    assert clean_caption("one " * 40) == " ".join(["one"] * 30)


@pytest.mark.parametrize("family", VIDEO_PROCESSOR_FAMILIES)
def test_max_length_is_honoured_by_the_video_processor_families(folders, family):
    images = tiny_models.pictures(3, sizes=SIZES)
    exact = captioner(folders, family, max_length=3, min_length=3)
    assert exact.generate_ids(images, ["a", "b", "c"]).shape == (3 * 3, 3)  # min = max: exactly 3 new tokens
    assert all(len(c.split()) <= 3 for captions in exact.caption(images, ["a", "b", "c"]) for c in captions)
    short = captioner(folders, family, max_length=2, min_length=0)
    assert short.generate_ids(images, ["a", "b", "c"], greedy=True).shape[1] <= 2


def test_a_prompt_without_image_token_is_refused(folders, tmp_path):
    import shutil

    folder = tmp_path / "llava-no-template"
    shutil.copytree(folders["llava"], folder)
    (folder / "chat_template.jinja").unlink()  # the raw prompt then carries no <image>
    with pytest.raises(ValueError, match="prompt 'describe the image' does not fit the processor .* chat template"):
        GenerateCaptioner(folder, replace(OPTIONS, prompt="describe the image"), CPU)  # refused at load
    model = GenerateCaptioner(folder, replace(OPTIONS, prompt="<image>describe the image"), CPU)
    assert len(model.caption(tiny_models.pictures(1), ["a"])[0]) == 3


def test_a_processor_that_inserts_no_image_tokens_is_refused(folders, tmp_path):
    import json
    import shutil

    folder = tmp_path / "blip2-old-processor"
    shutil.copytree(folders["blip-2"], folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    del config["num_query_tokens"]  # as processors saved before BLIP-2 expanded image tokens
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="leaves no image token in the input"):
        GenerateCaptioner(folder, replace(OPTIONS, prompt="a picture of"), CPU)


def test_bad_options_are_named(folders):
    with pytest.raises(ValueError, match="run.caption.num_captions must be at least 1"):
        captioner(folders, "llava", num_captions=0)


@pytest.mark.skipif(find_spec("torchvision") is None, reason="the whole processor needs torchvision")
@pytest.mark.parametrize("family", VIDEO_PROCESSOR_FAMILIES)
def test_image_only_processor_gives_the_whole_processors_inputs(folders, family):
    from transformers import AutoProcessor

    model = captioner(folders, family)
    whole = AutoProcessor.from_pretrained(str(folders[family]))
    whole.tokenizer.padding_side = "left"  # as the captioner pads
    assert type(whole.video_processor).__name__ != "BaseVideoProcessor"  # the family's own, with torchvision
    images = tiny_models.pictures(len(SIZES), sizes=SIZES)
    pictures = [[image] for image in images] if family in NESTED_IMAGE_FAMILIES else images
    ours = model.processor(images=pictures, text=[model.text] * len(images), padding=True, return_tensors="pt")
    stock = whole(images=pictures, text=[model.text] * len(images), padding=True, return_tensors="pt")
    assert sorted(ours) == sorted(stock)
    for name in stock:
        assert torch.equal(ours[name], stock[name]), name


def test_smolvlm_without_num2words_says_so(monkeypatch):
    from types import SimpleNamespace

    from capfilt.model import captioners
    from capfilt.model.captioners import load_processor
    from capfilt.model.families import Family

    monkeypatch.setattr(captioners, "importlib", SimpleNamespace(util=SimpleNamespace(
        find_spec=lambda name: None if name == "num2words" else find_spec(name))))
    with pytest.raises(ValueError, match="smolvlm processor needs num2words"):  # refused before the folder is read
        load_processor("/nowhere", Family("smolvlm", "captioner", "SmolVLMForConditionalGeneration", "generate"))


def test_paligemma_prompt_carries_the_image_token_its_processor_would_insert(folders):
    model = captioner(folders, "paligemma")
    assert model.text == model.processor.image_token + prompt("paligemma")  # its processor warns without it
    images = tiny_models.pictures(2, sizes=SIZES)
    ours = model.inputs(images)
    own = model.processor(images=images, text=[prompt("paligemma")] * 2, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], own["input_ids"])  # the same ids as its own insertion
