"""`capfilt eval`: ranking logic on controlled features, BLIP features against transformers' own
forward, the whole evaluation on tiny random models, and filter quality on a hand-made run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from capfilt import evaluate as ev
from capfilt import metrics
from capfilt.config import load_config
from capfilt.embed import load_captioner, load_filter
from capfilt.images import decode_image
from capfilt.model import blip_ops
from tests.tiny_blip import (WIDE_SPREAD, image_bytes, row, save_captioner, save_filter, save_published_captioner,
                             save_published_filter, write_shard)

N_GOOD = 8  # rows with an image; <= 10 so recall@10 must be 1.0 when every candidate is ranked


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_filter(root / "model" / "filter", spread=WIDE_SPREAD)
    save_captioner(root / "model" / "captioner", spread=WIDE_SPREAD)
    keys = [f"{i:09d}" for i in range(N_GOOD + 2)]
    captions = [f"a picture number {i} with a red circle" for i in range(N_GOOD)] + ["failed", "garbage"]
    images = [image_bytes(i) for i in range(N_GOOD)] + [None, b"not an image"]
    rows = [row(*fields) for fields in zip(keys, captions, images)]
    # Two shards, written out of key order: evaluation sorts by key.
    write_shard(root / "data" / "00001.parquet", rows[:5])
    write_shard(root / "data" / "00000.parquet", rows[5:])
    # The same kind of tiny models in the published Salesforce layout (no [ENC] in the tokenizer).
    save_published_filter(root / "published" / "filter", seed=2)
    save_published_captioner(root / "published" / "captioner", seed=2)
    return root


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_itm_reranking_fixes_a_controlled_itc_ranking():
    # Image i is e_i; text i is 0.8 e_{i+1} + 0.6 e_i, so by ITC image i prefers text i-1 (0.8) over
    # its own (0.6). An ITM that recognises true pairs (+1) must put the right text first.
    n = 4
    images = np.eye(n, dtype=np.float32)
    texts = (0.8 * np.roll(np.eye(n), -1, axis=1) + 0.6 * np.eye(n)).astype(np.float32)
    positives = [{i} for i in range(n)]
    calls = []

    def itm(image_ids, text_ids):
        calls.append(len(image_ids))
        return (image_ids == text_ids).astype(np.float32)

    out = ev.retrieval_scores(images, texts, positives, k=n, itm=itm)
    assert out["itc"]["i2t_r1"] == 0.0 and out["itc"]["i2t_r5"] == 1.0
    assert out["itm"]["i2t_r1"] == 1.0 and out["itm"]["t2i_r1"] == 1.0
    assert calls == [n * n, n * n]  # every (query, candidate) pair scored once each way
    # With one candidate the right answer is never ranked: a miss at every cut-off, not a hit at 5.
    out = ev.retrieval_scores(images, texts, positives, k=1, itm=itm)
    assert out["itm"]["i2t_r1"] == 0.0 and out["itm"]["i2t_r5"] == 0.0
    # Identical captions are interchangeable answers.
    groups = ev.caption_groups(["A red star.", "a red star", "a blue ring"])
    assert groups == [{0, 1}, {0, 1}, {2}]


def test_faiss_candidates_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    corpus = _unit(rng.normal(size=(50, 16))).astype(np.float32)
    queries = _unit(rng.normal(size=(20, 16))).astype(np.float32)
    scores, ids = ev.itc_candidates(queries, corpus, k=7)
    sims = queries @ corpus.T
    expected = np.argsort(-sims, axis=1)[:, :7]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), rtol=1e-5, atol=1e-6)
    assert ev.itc_candidates(queries, corpus[:3], k=7)[1].shape == (20, 3)  # k capped at the corpus


@pytest.mark.parametrize("layout", ["model", "published"])
def test_features_match_transformers_retrieval_forward(world, layout):
    """ITC and ITM as eval computes them equal stock transformers with [ENC] = 30523 first, in both layouts."""
    blip = load_filter(world / layout / "filter", torch.device("cpu"))
    assert blip.enc_token_id == 30523
    has_enc = "[ENC]" in blip.tokenizer.get_vocab()
    assert has_enc == (layout == "model")  # the published tokenizer lacks it, the id is BLIP's all the same
    images = [decode_image(image_bytes(i)) for i in range(3)]
    texts = ["a red circle", "two blue squares on black", "a star"]
    embeds, img_feats = blip.image_features(images)
    ids, mask = blip.tokenize(texts, 35)
    assert (ids[:, 0] == blip.tokenizer.cls_token_id).all()  # ITC text features use [CLS]
    pixels = blip.pixels(images)
    with torch.no_grad():
        cos = blip.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
        enc_ids = ids.clone()
        enc_ids[:, 0] = 30523
        logits = blip.model(input_ids=enc_ids, attention_mask=mask, pixel_values=pixels).itm_score
        cls_logits = blip.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
    ours_cos = img_feats @ blip_ops.text_features(blip.towers, ids, mask).T
    torch.testing.assert_close(ours_cos, cos, atol=1e-5, rtol=1e-5)
    ours_itm = blip_ops.itm_match(blip.towers, embeds, torch.arange(3), ids, mask, blip.enc_token_id)
    # Another code path (texts bucketed, keys/values projected once): fp32 sums in another order,
    # ~2e-6 here and up to ~2e-5 on other CPUs for this tiny model's P(match).
    torch.testing.assert_close(ours_itm, logits.softmax(-1)[:, 1], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(ours_itm, ours_itm[0].expand(3), atol=1e-4)  # not a constant
    assert not torch.allclose(ours_itm, cls_logits.softmax(-1)[:, 1], atol=1e-4)  # [CLS] first is another score


def test_eval_cli_on_published_layout_ranks_by_blip_itm(world, tmp_path):
    """`capfilt eval` on published-layout folders: retrieval equals a ranking by stock transformers
    features and P(match) with [ENC] = 30523 first."""
    from capfilt.cli import app

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(world / "published"), "--data", str(world / "data"),
                                   "--k", str(N_GOOD), "--out", str(out), "--set", "eval.num_beams=1"])
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    assert results["rows"]["evaluated"] == N_GOOD and len(results["captioning"]["examples"]) == N_GOOD

    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(world / "published" / "filter", use_safetensors=True).eval()
    processor = BlipProcessor.from_pretrained(world / "published" / "filter")
    images = [decode_image(image_bytes(i)) for i in range(N_GOOD)]
    captions = [f"a picture number {i} with a red circle" for i in range(N_GOOD)]
    inputs = processor(images=images, text=captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        img = torch.nn.functional.normalize(model.vision_proj(vision[:, 0]), dim=-1)
        txt = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        txt = torch.nn.functional.normalize(model.text_proj(txt.last_hidden_state[:, 0]), dim=-1)

    def stock_itm(image_ids, text_ids):
        ids = inputs["input_ids"][text_ids].clone()
        ids[:, 0] = 30523
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=inputs["attention_mask"][text_ids],
                           pixel_values=inputs["pixel_values"][image_ids]).itm_score
        return logits.softmax(-1)[:, 1].numpy()

    expected = ev.retrieval_scores(img.numpy(), txt.numpy(), ev.caption_groups(captions), N_GOOD, stock_itm)
    for ranking in ("itc", "itm"):
        assert results["retrieval"][ranking] == pytest.approx(expected[ranking])


def test_evaluate_end_to_end(world):
    cfg = load_config(None, ["eval.k=16", "eval.num_beams=1"])
    results = ev.evaluate(cfg, world / "model", world / "data")
    rows = results["rows"]
    assert rows["read"] == N_GOOD + 2 and rows["evaluated"] == N_GOOD
    assert rows["skipped"]["download"] == 1 and sum(rows["skipped"].values()) == 2
    ret = results["retrieval"]
    assert ret["n"] == N_GOOD and ret["k"] == N_GOOD
    # Every candidate is ranked, so the right one is always within 10.
    assert ret["itm"]["i2t_r10"] == 1.0 and ret["itm"]["t2i_r10"] == 1.0
    assert ret["itc"]["i2t_r10"] == 1.0

    # ITC-only recall@1 against a brute-force numpy ranking of the same model's features.
    blip = load_filter(world / "model" / "filter", torch.device("cpu"))
    images = [decode_image(image_bytes(i)) for i in range(N_GOOD)]
    _, img = blip.image_features(images)
    ids, mask = blip.tokenize([f"a picture number {i} with a red circle" for i in range(N_GOOD)], 35)
    sims = (img @ blip_ops.text_features(blip.towers, ids, mask).T).numpy()
    assert ret["itc"]["i2t_r1"] == pytest.approx(np.mean(sims.argmax(1) == np.arange(N_GOOD)))
    assert ret["itc"]["t2i_r1"] == pytest.approx(np.mean(sims.argmax(0) == np.arange(N_GOOD)))

    # Captions: the prompt is cut, the scores are those of the returned captions.
    cap = results["captioning"]
    examples = cap["examples"]
    assert [e["key"] for e in examples] == [f"{i:09d}" for i in range(N_GOOD)]
    captioner = load_captioner(world / "model" / "captioner", torch.device("cpu"))
    prompt = captioner.tokenizer("a picture of ", return_tensors="pt")["input_ids"]
    raw = captioner.model.generate(pixel_values=captioner.pixels(images[:1]), input_ids=prompt,
                                   num_beams=1, max_new_tokens=20, min_new_tokens=5, do_sample=False)
    full = captioner.tokenizer.decode(raw[0], skip_special_tokens=True)
    assert full.startswith("a picture of ") and examples[0]["generated"] == full[len("a picture of "):].strip()
    gen = [e["generated"] for e in examples]
    refs = [[e["reference"]] for e in examples]
    assert cap["bleu_4"] == pytest.approx(metrics.bleu(gen, refs)[3])
    assert cap["cider_d"] == pytest.approx(metrics.cider_d(gen, refs)[0])
    assert "attributes" not in cap  # real data: no demo-world attribute accuracy
    assert "captioning.cider_d" in ev.format_table(results)


def test_the_demo_worlds_truth_adds_attribute_accuracy(world, tmp_path):
    cfg = load_config(None, ["eval.k=4", "eval.num_beams=1", "eval.max_rows=2"])
    truth = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"key": ["0"], "clean_caption": ["a red circle"], "noise": ["clean"]}), truth)
    cap = ev.evaluate(cfg, world / "model", world / "data", truth=truth)["captioning"]
    assert 0.0 <= cap["attributes"]["recall"] <= 1.0
    with pytest.raises(FileNotFoundError, match="--truth"):
        ev.evaluate(cfg, world / "model", world / "data", truth=tmp_path / "none.parquet")


def test_eval_cli_writes_json(world, tmp_path):
    from capfilt.cli import app

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(world / "model" / "filter"), "--data",
                                   str(world / "data"), "--k", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["retrieval"]["k"] == 4 and "captioning" not in data  # a bare filter dir: retrieval only
    assert "retrieval.itm.mean_recall" in res.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(world / "model")])
    assert bad.exit_code == 1 and "--data" in bad.output


def test_evaluate_argument_pairs():
    cfg = load_config()
    with pytest.raises(ValueError, match="--capfilt-out needs --truth"):
        ev.evaluate(cfg, capfilt_out="run")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ev.evaluate(cfg)


def test_an_evaluation_split_on_object_storage_reads_as_the_folder(world, s3):
    from capfilt.storage import location

    bucket = s3.bucket()
    for path in sorted((world / "data").glob("*.parquet")):
        (location(f"s3://{bucket}/test") / path.name).write_bytes(path.read_bytes())
    remote = ev.read_split(f"s3://{bucket}/test", load_config().run.columns)
    local = ev.read_split(world / "data", load_config().run.columns)
    assert (remote.keys, remote.captions, remote.images, remote.read, remote.skipped) == (
        local.keys, local.captions, local.images, local.read, local.skipped)
    assert remote.read == N_GOOD + 2


def test_cider_d_comes_with_the_standard_error_of_its_per_image_mean():
    gen = ["a red circle on the left", "a blue star", "a green square at the top"]
    refs = ["a red circle on the left", "a big blue star on the right", "a small green cross"]
    cap = ev.caption_scores(gen, refs, None)
    per_image = metrics.cider_d(gen, [[r] for r in refs])[1]
    assert cap["cider_d"] == pytest.approx(np.mean(per_image))
    assert cap["cider_d_se"] == pytest.approx(np.std(per_image, ddof=1) / np.sqrt(3)) and cap["cider_d_se"] > 0
    assert ev.caption_scores(gen[:1], refs[:1], None)["cider_d_se"] is None
