"""MED: tokenizer, weight sharing, momentum encoders and queues, the three losses, persistence."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from capfilt.model.med import MED, contrastive_targets, gather_rows, lm_labels, med_config, sample_hard_negatives
from capfilt.model.tokenizer import build_tokenizer
from tests.tiny_blip import med_greedy_ids, med_scores, tiny_med_config


def small_config(**overrides):
    """The tiny MED with a short queue and no dropout, so each test step takes milliseconds."""
    return tiny_med_config(**{"queue_size": 32, "text_dropout": 0.0, **overrides})


TEXT_LEN = 16  # tokens per test text, [CLS] and [SEP] included

CAPTIONS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
            "a yellow star at the bottom", "two red squares", "a large blue circle"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_batch(tokenizer, cfg, n=4, seed=0):
    """n distinct images (a coloured block at a distinct place) with distinct captions."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g) * 0.1
    for i in range(n):
        pixels[i, i % 3, (i * 8) % cfg.image_size:(i * 8) % cfg.image_size + 8] += 2.0
    enc = tokenizer(CAPTIONS[:n], padding="max_length", max_length=TEXT_LEN, truncation=True,
                    return_tensors="pt")
    return pixels, enc.input_ids, enc.attention_mask, torch.arange(n)


# ---------------------------------------------------------------------------------------------
# Tokenizer and config


def test_tokenizer_is_offline_bert_with_dec_and_enc():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tok = build_tokenizer()
    assert len(tok) == 30524
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert tok.bos_token == "[DEC]"
    ids = tok("A Red circle").input_ids
    assert ids[0] == tok.cls_token_id == 101 and ids[-1] == tok.sep_token_id == 102
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]  # uncased WordPiece
    assert tok("[ENC] x").input_ids[1] == 30523  # a special token, never split


def test_presets_and_unknown_override():
    tok, tiny = build_tokenizer(), med_config("tiny")  # the default ids are the tokenizer's
    assert (tiny.vocab_size, tiny.pad_token_id, tiny.cls_token_id, tiny.sep_token_id) == (
        len(tok), tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)
    assert (tiny.dec_token_id, tiny.enc_token_id) == tuple(tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]))
    base = med_config("base")
    assert (base.image_size, base.patch_size, base.vision_hidden, base.vision_layers) == (224, 16, 768, 12)
    assert (base.text_hidden, base.text_layers, base.queue_size, base.embed_dim) == (768, 12, 57600, 256)
    assert med_config("large").vision_hidden == 1024 and med_config("large").vision_layers == 24
    assert med_config("base", image_size=384).image_size == 384
    with pytest.raises(ValueError, match="queue_sz"):
        med_config("tiny", queue_sz=8)
    with pytest.raises(ValueError, match="huge"):
        med_config("huge")


# ---------------------------------------------------------------------------------------------
# Structure


def test_encoder_and_decoder_share_all_but_self_attention():
    model = MED(small_config())
    enc, dec = model.text_encoder, model.text_decoder.bert
    enc_params = dict(enc.named_parameters(remove_duplicate=False))
    dec_params = dict(dec.named_parameters(remove_duplicate=False))
    assert enc_params.keys() == dec_params.keys()
    shared = [n for n in enc_params if ".attention." not in n]
    separate = [n for n in enc_params if ".attention." in n]
    assert any("crossattention" in n for n in shared) and any("embeddings" in n for n in shared)
    assert any("intermediate" in n for n in shared) and len(separate) > 0
    for name in shared:
        assert enc_params[name].data_ptr() == dec_params[name].data_ptr(), name
    for name in separate:
        assert enc_params[name].data_ptr() != dec_params[name].data_ptr(), name
    lm_weight = model.text_decoder.cls.predictions.decoder.weight
    assert lm_weight.data_ptr() == enc.embeddings.word_embeddings.weight.data_ptr()


def test_momentum_copies_frozen_equal_and_in_state_dict():
    model = MED(small_config())
    state = model.state_dict()
    for module_name in ("vision_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
        params = list(getattr(model, module_name).named_parameters())
        assert params and all(not p.requires_grad for _, p in params)
        assert all(f"{module_name}.{n}" in state for n, _ in params)
    pairs = list(model._momentum_pairs())
    assert len(pairs) == sum(1 for m in model._momentum_modules() for _ in m.parameters())
    for param, param_m in pairs:
        assert param.requires_grad
        assert torch.equal(param, param_m) and param.data_ptr() != param_m.data_ptr()
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert name in state


def test_momentum_update_follows_ema_formula():
    cfg = small_config()
    model = MED(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = [(p.clone(), p_m.clone()) for p, p_m in model._momentum_pairs()]
    model.momentum_update()
    for (p, p_m_old), (_, p_m) in zip(before, model._momentum_pairs()):
        expected = cfg.momentum * p_m_old + (1 - cfg.momentum) * p
        torch.testing.assert_close(p_m, expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(p_m, p_m_old)


def test_queue_pointer_advances_and_wraps_with_ragged_batches():
    model = MED(small_config(queue_size=10, embed_dim=4))
    for step, n in enumerate([4, 4, 3, 25]):  # 4+4 fills 8 slots, 3 wraps, 25 exceeds the queue
        feats = torch.nn.functional.normalize(torch.randn(n, 4), dim=1)
        idx = torch.arange(n) + 100 * step
        model.dequeue_and_enqueue(feats, -feats, idx)
        if step == 1:
            assert int(model.queue_ptr) == 8
            torch.testing.assert_close(model.image_queue[:, 4:8], feats.T)
        if step == 2:  # slots 8, 9, 0 hold it and the pointer wrapped to 1
            assert int(model.queue_ptr) == 1
            assert model.idx_queue[0, [8, 9, 0]].tolist() == idx.tolist()
            torch.testing.assert_close(model.text_queue[:, [8, 9, 0]], -feats.T)
    # a batch longer than the queue keeps its last 10 rows, starting at the pointer (1)
    assert int(model.queue_ptr) == 1
    slots = [(1 + i) % 10 for i in range(10)]
    assert model.idx_queue[0, slots].tolist() == idx[-10:].tolist()
    torch.testing.assert_close(model.image_queue[:, slots], feats[-10:].T)


def test_text_encoder_bidirectional_decoder_causal_and_padding_masked(tokenizer):
    cfg = small_config()
    model = MED(cfg).eval()
    pixels, ids, mask, _ = make_batch(tokenizer, cfg, n=2)
    changed = ids.clone()
    changed[:, 3] = tokenizer.convert_tokens_to_ids("zebra")
    with torch.no_grad():
        # Unimodal encoder: the [CLS] state sees a later token.
        assert not torch.allclose(model.encode_text(ids, mask)[:, 0], model.encode_text(changed, mask)[:, 0])
        # Decoder: positions before 3 do not see it, position 3 onwards do.
        image_embeds = model.encode_image(pixels)
        def logits(x):
            return model.text_decoder(input_ids=x, attention_mask=mask, encoder_hidden_states=image_embeds).logits
        a, b = logits(ids), logits(changed)
        torch.testing.assert_close(a[:, :3], b[:, :3])
        assert not torch.allclose(a[:, 3:5], b[:, 3:5])
        # Padding: changing ids under mask 0 leaves the unpadded states unchanged.
        padded = ids.clone()
        padded[mask == 0] = 1037
        real = mask.bool()
        torch.testing.assert_close(model.encode_text(ids, mask)[real], model.encode_text(padded, mask)[real])
        torch.testing.assert_close(model.encode_grounded(ids, mask, image_embeds),
                                   model.encode_grounded(padded, mask, image_embeds))


# ---------------------------------------------------------------------------------------------
# Losses


def test_forward_every_flag_combination_gives_finite_losses(tokenizer):
    cfg = small_config()
    model = MED(cfg)
    pixels, ids, mask, idx = make_batch(tokenizer, cfg, n=4)
    for itc, itm, lm in itertools.product([False, True], repeat=3):
        if not (itc or itm or lm):
            with pytest.raises(ValueError):
                model(pixels, ids, mask, idx, alpha=0.4, itc=False, itm=False, lm=False)
            continue
        out = model(pixels, ids, mask, idx, alpha=0.4, itc=itc, itm=itm, lm=lm)
        expected = {"loss"} | {k for k, on in (("loss_itc", itc), ("loss_itm", itm), ("loss_lm", lm)) if on}
        assert set(out) == expected
        assert all(torch.isfinite(v) for v in out.values())
        parts = sum(v for k, v in out.items() if k != "loss")
        torch.testing.assert_close(out["loss"], parts)
        out["loss"].backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_trains_and_keeps_fp32_queues(tokenizer, device):
    cfg = small_config()
    model = MED(cfg).to(device)
    batch = [t.to(device) for t in make_batch(tokenizer, cfg)]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(*batch, alpha=0.4)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.image_queue.dtype == torch.float32 and int(model.queue_ptr) == 4
    assert model.vision.embeddings.patch_embedding.weight.grad is not None
    with torch.autocast(device, dtype=torch.bfloat16):
        assert med_scores(model, *batch[:3])["itm"].dtype == torch.float32
        prompt_ids = tokenizer("a picture of ", add_special_tokens=False, return_tensors="pt").input_ids[0]
        assert med_greedy_ids(model, batch[0], prompt_ids, max_new_tokens=3).shape[0] == 4


def test_forward_refuses_a_prompt_that_leaves_no_target(tokenizer):
    cfg = small_config()
    with pytest.raises(ValueError, match="lm_prompt_len"):
        MED(cfg)(*make_batch(tokenizer, cfg), alpha=0.4, lm_prompt_len=TEXT_LEN)


def test_queues_move_only_when_training_with_itc_and_momentum_only_when_asked(tokenizer):
    cfg = small_config()
    model = MED(cfg)
    pixels, ids, mask, idx = make_batch(tokenizer, cfg, n=4)
    model(pixels, ids, mask, idx, alpha=0.4, itc=False)
    assert int(model.queue_ptr) == 0
    momentum = [p.clone() for _, p in model._momentum_pairs()]
    model(pixels, ids, mask, idx, alpha=0.4)
    assert int(model.queue_ptr) == 4 and model.idx_queue[0, :4].tolist() == idx.tolist()
    # The EMA is the trainer's, once per optimiser step (momentum_update), never forward's.
    assert all(torch.equal(before, p) for before, (_, p) in zip(momentum, model._momentum_pairs()))
    model.eval()
    model(pixels, ids, mask, idx, alpha=0.4)
    assert int(model.queue_ptr) == 4


def test_temperature_is_clamped(tokenizer):
    cfg = small_config()
    model = MED(cfg)
    with torch.no_grad():
        model.temp.fill_(5.0)
    model(*make_batch(tokenizer, cfg), alpha=0.4, itm=False, lm=False)
    assert model.temp.item() == pytest.approx(cfg.temp_max)


def test_itc_targets_treat_equal_idx_as_positives(tokenizer):
    targets = contrastive_targets(torch.tensor([7, 7, 8]), torch.tensor([7, 7, 8, 8, -100, 7]))
    positives = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1], [0, 0, 1, 1, 0, 0]])
    expected = positives / torch.tensor([[3], [3], [2]])
    torch.testing.assert_close(targets, expected)
    # forward uses them: the same two pairs cost differently as one sample id or as two
    cfg = small_config()
    model = MED(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=2)[:3]
    same = model(*batch, torch.tensor([7, 7]), alpha=0.0, itm=False, lm=False)["loss_itc"]
    apart = model(*batch, torch.tensor([7, 8]), alpha=0.0, itm=False, lm=False)["loss_itc"]
    assert not torch.isclose(same, apart)


def test_hard_negatives_never_positive_and_vectorised(tokenizer, monkeypatch):
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positive = idx[:, None] == idx[None, :]
    sim = torch.randn(8, 8) * 50  # sharp softmax: positives would dominate if not masked first
    sim[positive] += 1000
    for _ in range(200):
        cols, has_neg = sample_hard_negatives(sim, positive)
        assert has_neg.all()
        assert not positive[torch.arange(8), cols].any()
    lonely = torch.ones(3, 3, dtype=torch.bool)
    lonely[0, 2] = False
    cols, has_neg = sample_hard_negatives(torch.randn(3, 3), lonely)
    assert has_neg.tolist() == [True, False, False] and cols[0] == 2

    # One multinomial call per direction, whatever the batch size (no per-row loop).
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    cfg = small_config()
    model = MED(cfg)
    pixels, ids, mask, _ = make_batch(tokenizer, cfg, n=6)
    model(pixels, ids, mask, torch.tensor([0, 0, 1, 2, 3, 4]), alpha=0.4, itc=False, lm=False)
    assert calls == [torch.Size([6, 6]), torch.Size([6, 6])]
    # A batch of one sample id has no negatives at all: ITM trains on the positives alone.
    out = model(pixels, ids, mask, torch.zeros(6, dtype=torch.long), alpha=0.4, itc=False, lm=False)
    assert torch.isfinite(out["loss_itm"])


def test_lm_labels_mask_padding_and_prompt(tokenizer):
    enc = tokenizer(["a picture of a red circle"], padding="max_length", max_length=12, return_tensors="pt")
    ids = enc.input_ids.clone()
    ids[:, 0] = 30522
    prompt_len = len(tokenizer("a picture of ", add_special_tokens=False).input_ids)
    assert prompt_len == 3
    labels = lm_labels(ids, tokenizer.pad_token_id, prompt_len)
    assert (labels[0, :4] == -100).all()  # [DEC] a picture of
    assert labels[0, 4:8].tolist() == ids[0, 4:8].tolist()  # a red circle [SEP]
    assert ids[0, 7] == tokenizer.sep_token_id
    assert (labels[0, 8:] == -100).all() and (ids[0, 8:] == tokenizer.pad_token_id).all()
    no_prompt = lm_labels(ids, tokenizer.pad_token_id)
    assert no_prompt[0, 1:8].tolist() == ids[0, 1:8].tolist()


def test_lm_loss_is_shifted_masked_label_smoothed_cross_entropy(tokenizer):
    cfg = small_config()
    model = MED(cfg).eval()
    texts = ["a picture of a red circle", "a picture of two blue squares on the left"]
    enc = tokenizer(texts, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    pixels = make_batch(tokenizer, cfg, n=2)[0]
    with torch.no_grad():
        loss = model(pixels, enc.input_ids, enc.attention_mask, torch.arange(2), alpha=0.0, itc=False, itm=False,
                     lm_prompt_len=3)["loss_lm"]
        dec_ids = enc.input_ids.clone()
        dec_ids[:, 0] = cfg.dec_token_id
        logits = model.text_decoder(input_ids=dec_ids, attention_mask=enc.attention_mask,
                                    encoder_hidden_states=model.encode_image(pixels)).logits
        targets = dec_ids[:, 1:].masked_fill(enc.attention_mask[:, 1:] == 0, -100)
        targets[:, :3] = -100  # "a picture of" is context
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), targets.reshape(-1),
                                                     label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_all_three_losses_fall_when_overfitting_a_tiny_batch(tokenizer):
    torch.manual_seed(0)
    n, queue = 4, 8
    cfg = small_config(queue_size=queue, momentum=0.9)  # a faster EMA so 60 steps are enough
    model = MED(cfg)
    batch = make_batch(tokenizer, cfg, n=n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    history = []
    for _ in range(60):
        model.momentum_update()  # once per optimiser step, as the trainer does
        out = model(*batch, alpha=0.4)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})

    def tail(key):
        return sum(h[key] for h in history[-5:]) / 5

    # ITC: well below chance (uniform over batch + queue).
    assert tail("loss_itc") < 0.75 * math.log(n + queue), history[-1]
    # ITM: below 0.6365, the entropy of the label prior (1 positive : 2 negatives) that a model
    # ignoring image and text would reach.
    assert tail("loss_itm") < 0.62, history[-1]
    # LM: the captions are being memorised.
    assert tail("loss_lm") < 0.5 * history[0]["loss_lm"], history[-1]


# ---------------------------------------------------------------------------------------------
# Persistence


def test_save_load_round_trip_includes_buffers(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = small_config()
    model = MED(cfg)
    batch = make_batch(tokenizer, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = model(*batch, alpha=0.4)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["queue_size"] == cfg.queue_size
    loaded = MED.load(tmp_path)
    assert loaded.cfg == cfg
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert int(loaded.queue_ptr) == 8
    # sharing survives loading
    assert (loaded.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
            == loaded.text_encoder.embeddings.word_embeddings.weight.data_ptr())
    model.eval(), loaded.eval()
    a, b = med_scores(model, *batch[:3]), med_scores(loaded, *batch[:3])
    assert torch.equal(a["itm"], b["itm"]) and torch.equal(a["itc"], b["itc"])
    torch.manual_seed(1)
    loss_a = model(*batch, alpha=0.4)["loss"]
    torch.manual_seed(1)
    loss_b = loaded(*batch, alpha=0.4)["loss"]
    assert torch.equal(loss_a, loss_b)


def test_load_refuses_pickles(tmp_path):
    model = MED(small_config())
    model.save(tmp_path / "ok")
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), planted / "model.safetensors")  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="not a valid safetensors"):
        MED.load(planted)
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), only_bin / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        MED.load(only_bin)


# ---------------------------------------------------------------------------------------------
# Distributed helper


def _gather_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rows = torch.full((3 if rank == 0 else 2, 2), float(rank))  # ragged: 3 rows and 2 rows
    results[rank] = gather_rows(rows).tolist()
    dist.destroy_process_group()


def test_gather_rows_handles_ragged_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(port, results), nprocs=2, join=True)
        expected = [[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2
        assert results[0] == expected and results[1] == expected
    single = torch.randn(3, 2)
    assert gather_rows(single) is single
