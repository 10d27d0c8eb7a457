"""blip_ops: the [DEC]/[ENC] ids for each folder layout, the device rule, and one vision pass per image."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import BlipForImageTextRetrieval, BlipTextConfig

from capfilt.model import blip_ops
from capfilt.model.tokenizer import build_bert_tokenizer, build_tokenizer
from tests.tiny_blip import IMAGE_SIZE, blip_config


@pytest.fixture(scope="module")
def bert():
    return build_bert_tokenizer()


def test_special_ids_from_the_tokenizer_when_it_has_them(caplog):
    with caplog.at_level(logging.INFO, logger="capfilt.model.blip_ops"):
        assert blip_ops.special_token_ids(build_tokenizer(), BlipTextConfig()) == (30522, 30523)
    assert "[ENC] = 30523 (the tokenizer's own tokens)" in caplog.text


def test_special_ids_of_the_published_layout(bert, caplog):
    """bert-base-uncased (30522) beside a 30524-row embedding with bos 30522: BLIP's ids, not [CLS]."""
    published = BlipTextConfig(vocab_size=30524, bos_token_id=30522)
    with caplog.at_level(logging.INFO, logger="capfilt.model.blip_ops"):
        assert blip_ops.special_token_ids(bert, published) == (30522, 30523)
    assert "BLIP's ids" in caplog.text and "30524 rows" in caplog.text


@pytest.mark.parametrize("vocab_size, bos", [(30522, 30522), (30524, 101), (30530, 30522)])
def test_special_ids_fall_back_to_cls(bert, caplog, vocab_size, bos):
    with caplog.at_level(logging.INFO, logger="capfilt.model.blip_ops"):
        assert blip_ops.special_token_ids(bert, BlipTextConfig(vocab_size=vocab_size, bos_token_id=bos)) == (101, 101)
    assert "[CLS]" in caplog.text


def test_pick_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert blip_ops.pick_device() == (auto, torch.bfloat16 if auto.type == "cuda" else torch.float32)
    assert blip_ops.pick_device("bfloat16", "cpu") == (torch.device("cpu"), torch.bfloat16)
    assert blip_ops.pick_device("float32", "cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="float16"):
        blip_ops.pick_device("float16")


@pytest.fixture(scope="module")
def retrieval():
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(blip_config()).eval()


def test_owner_index_scores_each_text_against_its_own_image(retrieval, bert):
    """B images through the vision tower once, N texts by owner == each pair with its image repeated."""
    towers = blip_ops.Towers.of(retrieval)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    owner = torch.tensor([0, 0, 2, 1, 2])
    ids, mask = blip_ops.tokenize(bert, ["A red ball!", "two cats", "a tree", "x", "the sea, at night"], 35)
    itm, itc = blip_ops.score(towers, pixels, owner, ids, mask, 30523)
    pair_itm, pair_itc = blip_ops.score(towers, pixels[owner], torch.arange(5), ids, mask, 30523)
    torch.testing.assert_close(itm, pair_itm, atol=1e-6, rtol=0)
    torch.testing.assert_close(itc, pair_itc, atol=1e-6, rtol=0)
    assert itm.dtype == itc.dtype == torch.float32
    # The first token is the one given: [CLS] first is another ITM score, ITC does not use it.
    cls_itm, cls_itc = blip_ops.score(towers, pixels, owner, ids, mask, bert.cls_token_id)
    assert not torch.allclose(cls_itm, itm, atol=1e-4) and torch.equal(cls_itc, itc)


def test_tokenize_cleans_as_blip_and_truncates(bert):
    ids, mask = blip_ops.tokenize(bert, ['A "Dog" (running)!', "a dog running"], 4)
    assert torch.equal(ids[0], ids[1]) and ids.shape == (2, 4)  # [CLS] a dog [SEP]: cut to 4 tokens
    assert ids[0, 0] == bert.cls_token_id and ids[0, -1] == bert.sep_token_id and mask.all()


def test_bf16_towers_score_in_fp32(retrieval, bert):
    towers = blip_ops.Towers.of(retrieval.to(torch.bfloat16))
    try:
        ids, mask = blip_ops.tokenize(bert, ["a red ball"], 35)
        itm, itc = blip_ops.score(towers, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bfloat16),
                                  torch.tensor([0]), ids, mask, 30523)
        assert itm.dtype == itc.dtype == torch.float32 and 0 <= itm.item() <= 1
    finally:
        retrieval.to(torch.float32)
