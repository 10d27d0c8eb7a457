"""blip_ops: the [DEC]/[ENC] ids for each folder layout, the device rule, one vision pass per image,
and the fused text pass (text_pass): stock scores, K/V once per image, texts bucketed by length."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import BlipForImageTextRetrieval, BlipTextConfig

from capfilt.config import FilterConfig
from capfilt.model import blip_ops, text_pass
from capfilt.model.tokenizer import build_bert_tokenizer, build_tokenizer
from tests.tiny_blip import IMAGE_SIZE, blip_config, sharpen_attention


@pytest.fixture(scope="module")
def bert():
    return build_bert_tokenizer()


def test_special_ids_from_the_tokenizer_when_it_has_them(caplog):
    """The ordinary case is logged at DEBUG: once per model load, it cluttered the quiet console."""
    with caplog.at_level(logging.DEBUG, logger="capfilt.model.blip_ops"):
        assert blip_ops.special_token_ids(build_tokenizer(), BlipTextConfig()) == (30522, 30523)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "[DEC] = 30522, [ENC] = 30523 (the tokenizer's own tokens)")]


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
    # 3 images in the vision batch, or 5: fp32 sums in another order (~1e-7 here), nothing more.
    torch.testing.assert_close(itm, pair_itm, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc, pair_itc, atol=1e-5, rtol=0)
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


# Texts of 3 to 30 tokens: image 0 has three, image 1 none, image 2 one, image 3 two.
TEXTS = ["a red ball on the green grass near a very tall tree in the park at noon on a sunny day",
         "two cats", "x", "the sea, at night, with three small boats and a lighthouse", "a b c d e f g", "dog"]
OWNER = [0, 0, 0, 2, 3, 3]


@pytest.fixture(scope="module")
def sharp():
    """A tiny retrieval model with sharp attention (a wrong mask, query row or image shows in the scores)."""
    torch.manual_seed(1)
    return sharpen_attention(BlipForImageTextRetrieval(blip_config()).eval())


def stock_pair_scores(model, pixels, owner, ids, mask, enc_token_id):
    """Stock `BlipForImageTextRetrieval.forward`, pair by pair (image repeated): (ITM P(match), ITC cosine)."""
    enc_ids = ids.clone()
    enc_ids[:, 0] = enc_token_id  # BLIP's ITM reads [ENC] first; stock forward takes the ids as given
    per_pair = pixels[torch.tensor(owner)]  # [N, 3, S, S]
    with torch.no_grad():
        itm = model(input_ids=enc_ids, pixel_values=per_pair, attention_mask=mask, use_itm_head=True).itm_score
        cos = model(input_ids=ids, pixel_values=per_pair, attention_mask=mask, use_itm_head=False).itm_score
    return itm.softmax(dim=-1)[:, 1], cos.diagonal()  # [N], [N]


@pytest.mark.parametrize("bucket_tokens", [0, 1, 4, 8, 64])
def test_fused_pass_scores_equal_stock_retrieval_forward(sharp, bert, bucket_tokens):
    """ITM ([ENC] first) and ITC of texts of different lengths, images with 3/0/1/2 texts == stock."""
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids, mask = blip_ops.tokenize(bert, TEXTS, 35)
    assert len(set(mask.sum(dim=1).tolist())) >= 5  # lengths really differ: padding matters
    want_itm, want_itc = stock_pair_scores(sharp, pixels, OWNER, ids, mask, 30523)
    towers = blip_ops.Towers.of(sharp)
    itm, itc = blip_ops.score(towers, pixels, OWNER, ids, mask, 30523, bucket_tokens)
    torch.testing.assert_close(itm, want_itm, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc, want_itc, atol=1e-5, rtol=0)
    # The two halves on their own (eval's calls): ITM against a subset of images, ITC without one.
    image_embeds, _ = blip_ops.image_side(towers, pixels)
    torch.testing.assert_close(blip_ops.itm_match(towers, image_embeds, torch.tensor(OWNER), ids, mask, 30523,
                                                  bucket_tokens), want_itm, atol=1e-5, rtol=0)
    image_feat = blip_ops.image_side(towers, pixels)[1][torch.tensor(OWNER)]
    torch.testing.assert_close((image_feat * blip_ops.text_features(towers, ids, mask, bucket_tokens)).sum(-1),
                               want_itc, atol=1e-5, rtol=0)


def test_one_image_one_text_and_text_order(sharp, bert):
    """A single pair, and texts whose owners are not sorted: each score lands on its own text."""
    towers = blip_ops.Towers.of(sharp)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids, mask = blip_ops.tokenize(bert, TEXTS[:1], 35)
    itm, itc = blip_ops.score(towers, pixels[:1], [0], ids, mask, 30523)
    want_itm, want_itc = stock_pair_scores(sharp, pixels[:1], [0], ids, mask, 30523)
    torch.testing.assert_close((itm, itc), (want_itm, want_itc), atol=1e-5, rtol=0)
    owner = [2, 0, 2, 1, 0, 2]
    ids, mask = blip_ops.tokenize(bert, TEXTS, 35)
    itm, itc = blip_ops.score(towers, pixels, owner, ids, mask, 30523, bucket_tokens=4)
    want_itm, want_itc = stock_pair_scores(sharp, pixels, owner, ids, mask, 30523)
    torch.testing.assert_close((itm, itc), (want_itm, want_itc), atol=1e-5, rtol=0)


def test_cross_attention_keys_and_values_are_projected_once_per_image(sharp, bert):
    """Every layer's cross-attention key/value Linear runs once per score call, on the images with texts."""
    calls = []
    hooks = [proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
             for layer in sharp.text_encoder.encoder.layer
             for proj in (layer.crossattention.self.key, layer.crossattention.self.value)]
    try:
        ids, mask = blip_ops.tokenize(bert, TEXTS, 35)
        blip_ops.score(blip_ops.Towers.of(sharp), torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), OWNER, ids, mask,
                       30523, bucket_tokens=4)  # several buckets, texts of one image in more than one
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(sharp.text_encoder.encoder.layer)
    assert calls == [3] * (2 * layers)  # images 0, 2, 3 (image 1 has no text), not 6 texts, not per bucket


def test_buckets_pad_texts_to_their_own_group():
    """Lengths 3, 30, 5, 9 by 8 tokens: three buckets, each padded to its longest, texts by image then order."""
    buckets = text_pass.plan_buckets([3, 30, 5, 9], [1, 0, 0, 1], images=2, bucket_tokens=8)
    assert [(b.texts, b.length) for b in buckets] == [([2, 0], 5), ([3], 9), ([1], 30)]
    assert buckets[0].images is None and buckets[0].slots is None and buckets[0].per_image == 1  # a full grid
    assert buckets[1].images == [1] and buckets[2].images == [0]  # only their own image's K/V
    uneven = text_pass.plan_buckets([4, 4, 4], [0, 0, 1], images=2, bucket_tokens=8)[0]
    assert uneven.per_image == 2 and uneven.slots == [0, 1, 2]  # image 1's one text in slot 1 * 2 + 0
    assert [b.length for b in text_pass.plan_buckets([3, 30, 5, 9], None, 0, 0)] == [30]  # 0: one bucket
    assert FilterConfig().bucket_tokens == text_pass.BUCKET_TOKENS  # the run's default is the model's
