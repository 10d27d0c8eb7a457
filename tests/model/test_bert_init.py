"""Starting the MED's text side from the packaged pre-trained BERT (MiniLM-L6-H384)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from capfilt.model.bert_init import init_text_from_bert, packaged_bert_dir
from capfilt.model.med import MED, med_config
from capfilt.model.tokenizer import build_tokenizer
from tests.tiny_blip import bert_config

BERT_TEXT = dict(text_hidden=384, text_heads=12, text_intermediate=1536)


@pytest.fixture(scope="module")
def bert():
    return BertModel.from_pretrained(str(packaged_bert_dir()), use_safetensors=True).eval()


def test_unimodal_encoder_is_the_bert(bert):
    """With all six layers, MED's text encoder computes exactly what the BERT computes."""
    torch.manual_seed(0)
    model = MED(med_config("tiny", text_layers=6, **BERT_TEXT)).eval()
    init_text_from_bert(model, packaged_bert_dir())
    tokens = build_tokenizer()(["a small red circle at the top", "two big blue squares on grey"],
                               padding="longest", return_tensors="pt")
    ours = model.encode_text(tokens.input_ids, tokens.attention_mask)  # [2, T, 384]
    theirs = bert(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    mask = tokens.attention_mask.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=1e-4)
    # The momentum encoder starts from the same weights, so ITC targets are informative at once.
    momentum = model.text_encoder_m(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                    is_decoder=False).last_hidden_state
    torch.testing.assert_close(momentum[mask], theirs[mask], atol=1e-5, rtol=1e-4)


def test_decoder_gets_bert_self_attention_and_keeps_sharing(bert):
    torch.manual_seed(0)
    model = MED(med_config("tiny", text_layers=3, **BERT_TEXT))
    fresh_cross = model.text_encoder.encoder.layer[0].crossattention.self.query.weight.clone()
    init_text_from_bert(model, packaged_bert_dir())
    for i in range(3):
        bert_query = bert.encoder.layer[i].attention.self.query.weight
        torch.testing.assert_close(model.text_encoder.encoder.layer[i].attention.self.query.weight, bert_query)
        torch.testing.assert_close(model.text_decoder.bert.encoder.layer[i].attention.self.query.weight, bert_query)
        # Encoder and decoder still share everything but self-attention.
        assert model.text_decoder.bert.encoder.layer[i].intermediate is model.text_encoder.encoder.layer[i].intermediate
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    # BERT has no cross-attention: it keeps its fresh initialisation.
    torch.testing.assert_close(model.text_encoder.encoder.layer[0].crossattention.self.query.weight, fresh_cross)
    # [DEC] and [ENC] are new rows beyond BERT's vocabulary.
    words = model.text_encoder.embeddings.word_embeddings.weight
    torch.testing.assert_close(words[:30522], bert.embeddings.word_embeddings.weight)


def test_incompatible_shapes_are_named():
    with pytest.raises(ValueError, match="MEDConfig.text_hidden=128"):
        init_text_from_bert(MED(med_config("tiny")), packaged_bert_dir())
    with pytest.raises(ValueError, match="text_layers=8"):
        init_text_from_bert(MED(med_config("tiny", text_layers=8, **BERT_TEXT)), packaged_bert_dir())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        init_text_from_bert(MED(med_config("tiny", **BERT_TEXT)), tmp_path)


def _bert_base_layout(tmp_path, legacy_names: bool = False):
    """A tiny BertForMaskedLM saved as bert-base-uncased is laid out: names under `bert.`, the
    masked-LM head under `cls.`, optionally with the original checkpoints' LayerNorm gamma/beta."""
    from safetensors.torch import load_file, save_file
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(bert_config(max_position_embeddings=64)).eval()
    bert.save_pretrained(tmp_path, safe_serialization=True)
    if legacy_names:
        tensors = load_file(tmp_path / "model.safetensors")
        renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                   for k, v in tensors.items()}
        save_file(renamed, tmp_path / "model.safetensors")
    return bert


@pytest.mark.parametrize("legacy_names", [False, True])
def test_bert_base_layout_folder_initialises_encoder_decoder_and_lm_head(tmp_path, legacy_names):
    bert = _bert_base_layout(tmp_path, legacy_names)
    torch.manual_seed(1)
    model = MED(med_config("tiny", text_hidden=64, text_heads=2, text_intermediate=128, text_layers=2,
                           text_max_positions=64)).eval()
    init_text_from_bert(model, tmp_path)
    tokens = build_tokenizer()(["a small red circle at the top"], return_tensors="pt")
    ours = model.encode_text(tokens.input_ids, tokens.attention_mask)
    theirs = bert.bert(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # BLIP's decoder starts as BertLMHeadModel.from_pretrained: the MLM head's transform and bias too.
    head, mlm = model.text_decoder.cls.predictions, bert.cls.predictions
    torch.testing.assert_close(head.transform.dense.weight, mlm.transform.dense.weight)
    torch.testing.assert_close(head.transform.LayerNorm.weight, mlm.transform.LayerNorm.weight)
    torch.testing.assert_close(head.bias[:30522], mlm.bias)
    torch.testing.assert_close(model.text_decoder.bert.encoder.layer[1].attention.self.key.weight,
                               bert.bert.encoder.layer[1].attention.self.key.weight)


def test_base_and_large_presets_take_a_bert_base_folder():
    from types import SimpleNamespace

    from capfilt.model.bert_init import check_compatible

    bert_base = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12,
                     max_position_embeddings=512, vocab_size=30522)  # bert-base-uncased's config.json
    for size in ("base", "large"):
        check_compatible(SimpleNamespace(cfg=med_config(size)), bert_base)
