"""The stage classes without Ray: prepare routing, decoding in the model actors, captioner, filter (vs stock
transformers), policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import BlipForImageTextRetrieval

from capfilt import schema
from capfilt.commit import route
from capfilt.config import CaptionConfig, ConfigError, FilterConfig, RunConfig, ScorerConfig, check
from capfilt.images import DecodedImages, ImageSpec, load_image_spec, pixel_values
from capfilt.model.image_config import ImageConfig
from capfilt.model.caption_decode import decode_captions
from capfilt.model.utf8 import utf8_text
from capfilt.stages.caption import Captioner
from capfilt.stages.filter import Filter
from capfilt.stages.fused import CaptionAndFilter
from capfilt.stages.policy import KeepPolicy
from capfilt.stages.prepare import BAD_UTF8, Prepare
from tests.bad_input import string_array_unchecked
from tests.tiny_blip import INPUT_SCHEMA, IMAGE_SIZE, greedy, save_early_captioner, shard_rows


def run_config(dirs, **caption) -> RunConfig:
    caption = {"model": str(dirs["captioner"]), "max_length": 8, "min_length": 3, **caption}
    return RunConfig(caption=CaptionConfig(**caption), filter=FilterConfig(model=str(dirs["filter"])))


@pytest.fixture(scope="module")
def cfg(blip_dirs):
    return run_config(blip_dirs, num_captions=3)


@pytest.fixture(scope="module")
def captioner(cfg):
    return Captioner(cfg)


@pytest.fixture(scope="module")
def scorer(cfg):
    return Filter(cfg)


@pytest.fixture(scope="module")
def prepared(cfg):
    """8 input rows after Prepare: 5 good, 1 corrupt image, 2 failed downloads."""
    table = pa.Table.from_pylist(shard_rows("s", 8, failed=2, corrupt=1), schema=INPUT_SCHEMA)
    return Prepare(cfg)(table)


def images_of(prepared: pa.Table, rows, side: int = IMAGE_SIZE) -> np.ndarray:
    """`rows` of a prepared batch prepared as the model actors decode them. -> uint8 [B, side, side, 3]"""
    return DecodedImages.decode(prepared["jpg"].to_pylist(), list(rows), ImageConfig(), {side}).uint8(list(rows), side)


@pytest.fixture(scope="module")
def early_dir(tmp_path_factory):
    """A tiny captioner whose greedy captions end at different steps per image (tests.tiny_blip.stop_early)."""
    return save_early_captioner(tmp_path_factory.mktemp("early") / "captioner")


def test_prepare_routes_failed_downloads_and_keeps_only_what_the_models_read(prepared):
    errors = prepared[schema.ERROR].to_pylist()
    assert errors[:6] == [None] * 6  # the corrupt image is the model actor's to find (it decodes)
    assert errors[6:] == ["download: timed out"] * 2
    assert prepared.column_names == ["key", "jpg", "caption", schema.ERROR]
    images = prepared["jpg"].to_pylist()
    assert all(images[:6]) and images[6:] == [None] * 2  # a failed row's bytes go no further


def test_decode_null_key_and_missing_status_column(cfg):
    rows = shard_rows("k", 3, failed=0, corrupt=0)
    rows[0]["key"] = None
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA).drop_columns(["status", "error_message"])
    out = Prepare(cfg)(table)
    assert out[schema.ERROR].to_pylist() == ["input: key is null", None, None]


def test_captioner_returns_k_captions_without_prompt(captioner, prepared):
    out = captioner(prepared)
    synthetic = out[schema.SYNTHETIC].to_pylist()
    assert [len(s) for s in synthetic[:5]] == [3] * 5
    assert synthetic[5:] == [None] * 3  # failed rows are not captioned
    decode_errors = out[schema.DECODE_ERROR].to_pylist()
    assert decode_errors[:5] == [None] * 5 and decode_errors[5].startswith("decode: ")  # the corrupt image alone
    assert decode_errors[6:] == [None] * 2  # failed before: not decoded at all
    for captions in synthetic[:5]:
        assert all(isinstance(c, str) and c for c in captions)
        assert not any(c.startswith("a picture of") for c in captions)
    assert out[schema.CAPTION_ERROR].null_count == 8
    assert out.column_names[: prepared.num_columns] == prepared.column_names  # only adds columns


@pytest.mark.parametrize("model", ["random", "early"])
def test_sampling_is_seeded_per_row_not_per_batch(model, captioner, early_dir, prepared):
    if model == "early":  # images finish at different steps and leave the batch at different checks
        captioner = Captioner(run_config({"captioner": early_dir, "filter": ""}, num_captions=3,
                                         max_length=12, eos_check_every=2))
    images = pixel_values(images_of(prepared, range(5)), captioner.spec)  # [5, 3, S, S]
    keys = prepared["key"].to_pylist()[:5]
    together = captioner.caption(images, keys)
    alone = [captioner.caption(images[i : i + 1], keys[i : i + 1])[0] for i in range(5)]
    reversed_batch = captioner.caption(images.flip(0), keys[::-1])[::-1]
    assert together == alone == reversed_batch
    # Another key (or seed) draws other captions for the same pixels.
    assert captioner.caption(images[:1], ["another-key"]) != together[:1]
    assert len(set(together[0])) > 1  # the K captions of one image differ
    if model == "early":
        lengths = {len(c.split()) for group in together for c in group}
        assert len(lengths) > 1  # captions of several lengths: rows finished at different steps


def stock_greedy(model_dir, images: np.ndarray, cfg: CaptionConfig) -> tuple[torch.Tensor, list[str]]:
    """Plain transformers: a freshly loaded (eager) captioner's greedy `generate`. -> new ids [B, T], texts"""
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer([cfg.prompt] * len(images), return_tensors="pt")["input_ids"]  # [CLS] ... [SEP]
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values(images, load_image_spec(model_dir)), input_ids=prompt,
                             do_sample=False, num_beams=1, min_new_tokens=cfg.min_length,
                             max_new_tokens=cfg.max_length, repetition_penalty=cfg.repetition_penalty)
    new = out[:, prompt.shape[1] - 1:]  # generate drops the trailing [SEP] and puts [DEC] first
    return new, [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("model, check_every", [("random", 4), ("early", 1), ("early", 3)])
def test_greedy_loop_is_token_identical_to_transformers_generate(model, check_every, blip_dirs, early_dir, prepared):
    model_dir = early_dir if model == "early" else blip_dirs["captioner"]
    images = images_of(prepared, range(5))
    ours = Captioner(run_config({"captioner": model_dir, "filter": ""}, num_captions=3, max_length=10,
                                eos_check_every=check_every))
    want, texts = stock_greedy(model_dir, images, ours.cfg)
    if model == "early":  # the case this model exists for: rows end at different steps, some never
        ends = [(row == ours.eos_token_id).nonzero().flatten()[:1].tolist() for row in want]
        assert len({tuple(e) for e in ends}) > 1 and [] in ends
    with torch.no_grad():
        embeds = ours.model.vision_model(pixel_values=pixel_values(images, ours.spec)).last_hidden_state
        uniforms = torch.zeros(15, ours.cfg.max_length)
        ids = decode_captions(ours.decoder, embeds, ours.prompt_ids, 3, greedy, uniforms, ours.settings)  # [15, T]
    width = want.shape[1]
    assert torch.equal(ids[:, :width], want.repeat_interleave(3, dim=0))  # K = 3 greedy copies of each
    assert bool((ids[:, width:] == ours.pad_token_id).all())  # steps run past the last end: padding only
    got = ours.caption(pixel_values(images, ours.spec), [str(i) for i in range(5)], choose=greedy)
    assert got == [[t] * 3 for t in texts]


def test_decode_settings_are_checked_and_compiling_is_off_by_default(blip_dirs, monkeypatch):
    assert CaptionConfig().cuda_graphs is False and CaptionConfig().top_k == 50
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    Captioner(run_config(blip_dirs))
    assert compiled == []  # the default path runs the plain step
    Captioner(run_config(blip_dirs, cuda_graphs=True))
    assert compiled == [{"mode": "reduce-overhead"}]
    for key, bad in (("top_k", -1), ("eos_check_every", 0), ("max_length", 0)):
        with pytest.raises(ConfigError, match=f"run.caption.{key}"):
            check(run_config(blip_dirs, **{key: bad}), "run")
    long = Captioner(run_config(blip_dirs, max_length=64))  # prompt + 64 > the tiny decoder's 64 positions
    with pytest.raises(ValueError, match="run.caption.max_length"):
        long.caption(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), ["k"])


def test_beam_search_matches_generate(blip_dirs, prepared):
    beam = Captioner(run_config(blip_dirs, num_captions=2, beam=True, num_beams=3))
    images = images_of(prepared, range(2))
    got = beam.caption(pixel_values(images, beam.spec), ["a", "b"])
    cfg = beam.cfg
    prompt = beam.tokenizer([cfg.prompt] * 2, return_tensors="pt")["input_ids"]
    from transformers import BlipForConditionalGeneration

    stock_model = BlipForConditionalGeneration.from_pretrained(blip_dirs["captioner"]).eval()  # eager attention
    stock = stock_model.generate(pixel_values=pixel_values(images, beam.spec), input_ids=prompt, num_beams=3,
                                num_return_sequences=2, do_sample=False, min_new_tokens=cfg.min_length,
                                max_new_tokens=cfg.max_length, repetition_penalty=cfg.repetition_penalty)
    texts = [t.strip() for t in beam.tokenizer.batch_decode(stock[:, prompt.shape[1] - 1:],
                                                            skip_special_tokens=True)]
    assert got == [texts[0:2], texts[2:4]]


FILTER_TEXTS = [["a red circle", "click here for more"], ["two shapes on white"],
                ["a small green star on the left", "x", "best price free shipping"]]


def stock_scores(model, tok, pixels, texts, first_id):
    """Plain transformers: ITM P(match) with `first_id` first and the ITC cosine, each text vs `pixels` [1, 3, S, S]."""
    ids = tok(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    enc_ids = ids["input_ids"].clone()
    enc_ids[:, 0] = first_id
    with torch.no_grad():
        logits = model(input_ids=enc_ids, attention_mask=ids["attention_mask"],
                       pixel_values=pixels.expand(len(texts), -1, -1, -1)).itm_score
        cosine = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels,
                       use_itm_head=False).itm_score[0]
    return logits.softmax(-1)[:, 1].numpy(), cosine.numpy()


@pytest.mark.parametrize("layout", ["ours", "published"])
def test_filter_scores_equal_stock_retrieval_forward_with_enc_first(layout, blip_dirs, published_blip_dirs):
    """Our exports carry [ENC] in the tokenizer; the published folders do not, and still score with 30523."""
    dirs = blip_dirs if layout == "ours" else published_blip_dirs
    scorer = Filter(run_config(dirs))
    blip = scorer.blip
    assert (blip.dec_token_id, blip.enc_token_id) == (30522, 30523)
    assert ("[ENC]" in blip.tokenizer.get_vocab()) == (layout == "ours")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels = pixel_values(images, blip.spec)
    itm, itc = scorer.score(pixels, FILTER_TEXTS)
    stock = BlipForImageTextRetrieval.from_pretrained(dirs["filter"]).eval()  # eager attention, stock forward
    cls_gap = 0.0
    for i, group in enumerate(FILTER_TEXTS):
        stock_itm, stock_itc = stock_scores(stock, blip.tokenizer, pixels[i : i + 1], group, 30523)
        np.testing.assert_allclose(itm[i], stock_itm, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(itc[i], stock_itc, rtol=1e-4, atol=1e-6)
        cls_itm, _ = stock_scores(stock, blip.tokenizer, pixels[i : i + 1], group, blip.tokenizer.cls_token_id)
        cls_gap = max(cls_gap, float(np.abs(cls_itm - np.asarray(itm[i])).max()))
    assert cls_gap > 1e-2  # [CLS] first (what the published tokenizer alone gives) is another score
    assert len({round(p, 6) for group in itm for p in group}) > 1  # the scores are not constant


def test_filter_bucket_tokens_is_checked_and_changes_no_score(blip_dirs):
    with pytest.raises(ConfigError, match="run.filter.bucket_tokens"):
        check(dataclasses.replace(run_config(blip_dirs), filter=FilterConfig(bucket_tokens=-1)), "run")
    images = np.random.default_rng(2).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels = pixel_values(images, load_image_spec(blip_dirs["filter"]))
    scores = [Filter(dataclasses.replace(run_config(blip_dirs), filter=FilterConfig(
        model=str(blip_dirs["filter"]), bucket_tokens=b))).score(pixels, FILTER_TEXTS) for b in (0, 2)]
    # Other padded lengths: fp32 sums in another order only (about 1e-6 here, up to ~2e-5 on other
    # CPUs for a P(match) of this tiny model; a wrong text or image moves a score by far more).
    np.testing.assert_allclose(np.concatenate(sum(scores[0], [])), np.concatenate(sum(scores[1], [])),
                               rtol=0, atol=1e-4)


def test_filter_scores_texts_as_blip_cleans_them(scorer):
    """Web and synthetic texts alike are scored after BLIP's pre_caption; the raw text would score otherwise."""
    rng = np.random.default_rng(1)
    blip = scorer.blip
    pixels = pixel_values(rng.integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), blip.spec)
    raw = ['A RED circle!!! (on the "left")', "two; shapes: on~white*"]
    clean = ["a red circle on the left", "two shapes on white"]
    assert scorer.score(pixels, [raw]) == scorer.score(pixels, [clean])
    stock_raw, _ = stock_scores(blip.model, blip.tokenizer, pixels, raw, 30523)
    assert np.abs(stock_raw - np.asarray(scorer.score(pixels, [raw])[0][0])).max() > 1e-4


def test_filter_stage_columns_and_blank_web_caption(cfg, captioner, scorer, prepared):
    table = prepared.set_column(prepared.column_names.index("caption"), "caption",
                               pa.array([None, "  "] + prepared["caption"].to_pylist()[2:]))
    out = scorer(captioner(table))
    assert out[schema.CAPTION_ITM].to_pylist()[:2] == [None, None]  # nothing to score
    assert all(v is not None for v in out[schema.CAPTION_ITM].to_pylist()[2:5])
    assert [len(v) for v in out[schema.SYNTHETIC_ITM].to_pylist()[:5]] == [3] * 5
    assert out[schema.SYNTHETIC_ITC].to_pylist()[5:] == [None] * 3
    assert all(-1.0 <= c <= 1.0 for group in out[schema.SYNTHETIC_ITC].to_pylist()[:5] for c in group)


def test_the_filter_drops_the_image_bytes_and_the_policy_gets_none(cfg, captioner, scorer, prepared):
    """The filter is the last model stage: its output, the keep policy's input, has no image column."""
    assert "jpg" in captioner(prepared).column_names  # two pools: the captioner passes the bytes on to the filter
    scored = scorer(captioner(prepared))
    assert "jpg" not in scored.column_names and not any(t == pa.binary() for t in scored.schema.types)
    out = KeepPolicy(cfg)(scored)
    assert "jpg" not in out.column_names and out.num_rows == prepared.num_rows


def test_the_fused_actor_adds_what_the_two_stages_add(cfg, captioner, scorer, prepared):
    """One process with both models (the default) == captioner then filter, column for column."""
    assert CaptionAndFilter(cfg)(prepared).equals(scorer(captioner(prepared)))


def test_decoded_images_are_normalised_once_and_read_as_views(cfg):
    """A block is decoded once; each preprocessing normalises it once; consecutive rows are a view."""
    rows = shard_rows("v", 6, failed=0, corrupt=1)  # row 5 corrupt
    data = [r["jpg"] for r in rows]
    images = DecodedImages.decode(data, [0, 2, 3, 4, 5], ImageConfig(), {IMAGE_SIZE, 16})
    assert images.rows == [0, 2, 3, 4] and list(images.errors) == [5] and images.errors[5].startswith("decode: ")
    assert images.pixels[16].shape == (4, 16, 16, 3)
    spec = ImageSpec(IMAGE_SIZE)
    block = images.tensor([0, 2, 3, 4], spec, torch.device("cpu"), torch.float32)  # [4, 3, S, S]
    view = images.tensor([2, 3], spec, torch.device("cpu"), torch.float32)
    assert view.data_ptr() == block[1].data_ptr()  # no copy, no second normalisation
    gathered = images.tensor([0, 3], spec, torch.device("cpu"), torch.float32)
    assert torch.equal(gathered, block[[0, 2]])
    # The same bits as normalising those rows alone (the stages' batches do not depend on the block).
    assert torch.equal(view, pixel_values(images.uint8([2, 3], IMAGE_SIZE), spec))
    assert torch.equal(block, pixel_values(images.pixels[IMAGE_SIZE], spec))


def test_every_refused_image_fails_its_row_alone_with_its_reason(cfg):
    """One batch of hostile images: each gets the bounded decoder's own reason; the good rows are captioned."""
    from tests.bad_input import IMAGE_CONFIG, image_cases

    hostile = image_cases()
    good = [r["jpg"] for r in shard_rows("g", 2, failed=0, corrupt=0)]
    data = [good[0], *(image for image, _ in hostile.values()), good[1]]
    table = pa.table({"key": [f"k{i}" for i in range(len(data))], "jpg": pa.array(data, pa.binary()),
                      "caption": ["a caption"] * len(data), schema.ERROR: pa.array([None] * len(data), pa.string())})
    run = dataclasses.replace(cfg, image=IMAGE_CONFIG)
    out = CaptionAndFilter(run)(table)
    decode_errors = out[schema.DECODE_ERROR].to_pylist()
    for (name, (_, reason)), got in zip(hostile.items(), decode_errors[1:-1]):
        # None: an odd but valid image (CMYK, 16-bit, alpha, palette, animated), captioned like any other
        assert got is None if reason is None else got.startswith(reason), (name, got)
    synthetic = out[schema.SYNTHETIC].to_pylist()
    for error, captions in zip(decode_errors, synthetic):
        assert (captions is None) == (error is not None)
    assert synthetic[0] and synthetic[-1] and out[schema.CAPTION_ERROR].null_count == len(data)


def test_a_row_the_model_fails_on_fails_alone(captioner, prepared, monkeypatch):
    real = captioner.caption
    bad_key = prepared["key"].to_pylist()[1]

    def caption(pixels, keys):  # the real model, failing on one row (an OOM, a bad value) as a model can
        if bad_key in keys:
            raise RuntimeError("a row the model cannot take")
        return real(pixels, keys)

    monkeypatch.setattr(captioner, "caption", caption)
    out = captioner(prepared)
    errors = out[schema.CAPTION_ERROR].to_pylist()
    assert errors[1].startswith("caption: ") and errors[0] is None and errors[2:5] == [None] * 3
    assert out[schema.SYNTHETIC].to_pylist()[1] is None
    assert len(out[schema.SYNTHETIC].to_pylist()[0]) == 3


def scored_table(rows: list[dict]) -> pa.Table:
    """A filter-stage batch built by hand: web caption, its ITM, synthetic captions and theirs."""
    n = len(rows)
    return pa.table({
        "key": [f"k{i}" for i in range(n)],
        "caption": [r["web"] for r in rows],
        schema.SHARD: ["s"] * n,
        schema.ERROR: pa.array([r.get("error") for r in rows], pa.string()),
        schema.DECODE_ERROR: pa.array([None] * n, pa.string()),
        schema.SYNTHETIC: pa.array([r["syn"] for r in rows], pa.list_(pa.string())),
        schema.CAPTION_ERROR: pa.array([r.get("caption_error") for r in rows], pa.string()),
        schema.CAPTION_ITM: pa.array([r["web_itm"] for r in rows], pa.float32()),
        schema.CAPTION_ITC: pa.array([0.1] * n, pa.float32()),
        schema.SYNTHETIC_ITM: pa.array([r["syn_itm"] for r in rows], pa.list_(pa.float32())),
        schema.SYNTHETIC_ITC: pa.array([r.get("syn_itc", [0.1] * len(r["syn"] or [])) for r in rows],
                                       pa.list_(pa.float32())),
        schema.FILTER_ERROR: pa.array([None] * n, pa.string()),
    })


POLICY_ROWS = [
    {"web": "good web", "web_itm": 0.9, "syn": ["good syn", "bad syn"], "syn_itm": [0.8, 0.1]},
    {"web": "bad web", "web_itm": 0.2, "syn": ["good syn 2"], "syn_itm": [0.7]},
    {"web": "bad web 2", "web_itm": 0.1, "syn": ["bad"], "syn_itm": [0.3]},
    {"web": "same", "web_itm": 0.5, "syn": ["same", "same"], "syn_itm": [0.6, 0.9]},  # at threshold, duplicates
    {"web": None, "web_itm": None, "syn": ["good syn 3"], "syn_itm": [0.95]},
    {"web": "x", "web_itm": None, "syn": None, "syn_itm": None, "error": "download: 404"},
    {"web": "y", "web_itm": None, "syn": None, "syn_itm": None, "caption_error": "caption: OOM"},
]


@pytest.mark.parametrize("keep, texts, routes", [
    ("both", [["good web", "good syn"], ["good syn 2"], [], ["same"], ["good syn 3"], None, None],
     ["data", "data", "rejected", "data", "data", "failed", "failed"]),
    ("web", [["good web"], [], [], ["same"], [], None, None],
     ["data", "rejected", "rejected", "data", "rejected", "failed", "failed"]),
    ("synthetic", [["good syn"], ["good syn 2"], [], ["same"], ["good syn 3"], None, None],
     ["data", "data", "rejected", "data", "data", "failed", "failed"]),
])
def test_keep_policy_modes_and_routing(keep, texts, routes):
    cfg = RunConfig(round=2, filter=FilterConfig(keep=keep, threshold=0.5, model="F"),
                    caption=CaptionConfig(model="C"))
    out = KeepPolicy(cfg)(scored_table(POLICY_ROWS))
    assert out[schema.TEXTS].to_pylist() == texts
    caption_keep = out[schema.CAPTION_KEEP].to_pylist()
    assert caption_keep[0] is (keep != "synthetic") and caption_keep[1] is False
    assert out[schema.SYNTHETIC_KEEP].to_pylist()[0] == [keep != "web", False]
    assert out[schema.ERROR].to_pylist()[5:] == ["download: 404", "caption: OOM"]
    assert set(out[schema.KEEP_POLICY].to_pylist()) == {keep}
    assert set(out[schema.ROUND].to_pylist()) == {2} and set(out[schema.CAPTIONER].to_pylist()) == {"C"}
    assert not set(schema.TRANSIENT[1:]) & set(out.column_names)  # pixels and stage errors dropped
    routed = route(out)
    assert sum(t.num_rows for t in routed.values()) == len(POLICY_ROWS)
    for dest, table in routed.items():
        assert sorted(table["key"].to_pylist()) == sorted(f"k{i}" for i, r in enumerate(routes) if r == dest)


def keep_top_k(rows: list[dict], k: int, rank_by: str = "itm", keep: str = "both") -> pa.Table:
    cfg = RunConfig(filter=FilterConfig(threshold=0.5, keep=keep, top_k_synthetic=k, rank_synthetic_by=rank_by))
    return KeepPolicy(cfg)(scored_table(rows))


RANKED = {"web": "a web caption", "web_itm": 0.9, "syn": ["s0", "s1", "s2", "s3", "s4"],
          "syn_itm": [0.6, 0.9, 0.4, 0.8, 0.7], "syn_itc": [0.5, 0.1, 0.9, 0.3, 0.2]}


@pytest.mark.parametrize("rank_by, expected", [
    ("itm", [False, True, False, True, False]),  # s1 (0.9) and s3 (0.8) of the four that pass
    ("itc", [True, False, False, True, False]),  # s0 (0.5) and s3 (0.3); s2 has the best ITC but fails ITM
])
def test_top_k_keeps_the_best_passing_synthetic_captions(rank_by, expected):
    out = keep_top_k([RANKED], k=2, rank_by=rank_by)
    assert out[schema.SYNTHETIC_KEEP].to_pylist() == [expected]
    chosen = [t for t, kept in zip(RANKED["syn"], expected) if kept]
    assert out[schema.TEXTS].to_pylist() == [["a web caption", *chosen]]  # caption order after the web caption
    assert out[schema.CAPTION_KEEP].to_pylist() == [True]  # the web caption is not ranked against them
    # k = 0 (the default) keeps all four that pass; k above the number passing keeps those same four.
    every = [True, True, False, True, True]
    assert keep_top_k([RANKED], k=0, rank_by=rank_by)[schema.SYNTHETIC_KEEP].to_pylist() == [every]
    assert keep_top_k([RANKED], k=10, rank_by=rank_by)[schema.SYNTHETIC_KEEP].to_pylist() == [every]


def test_top_k_ties_repeats_and_the_web_caption():
    rows = [
        {"web": "w", "web_itm": 0.1, "syn": ["a", "b", "c"], "syn_itm": [0.7, 0.7, 0.7]},  # ties: earlier first
        {"web": "w", "web_itm": 0.1, "syn": ["same", "same ", "other"], "syn_itm": [0.9, 0.9, 0.6]},  # repeat skipped
        {"web": "dup", "web_itm": 0.9, "syn": ["dup", "x", "y"], "syn_itm": [0.95, 0.6, 0.55]},  # kept web caption
        {"web": "low", "web_itm": 0.2, "syn": ["low", "z"], "syn_itm": [0.8, 0.7]},  # web not kept: may repeat it
        {"web": "w", "web_itm": 0.9, "syn": ["p", "q"], "syn_itm": [0.1, 0.2]},  # none pass: web alone
    ]
    out = keep_top_k(rows, k=2)
    assert out[schema.SYNTHETIC_KEEP].to_pylist() == [
        [True, True, False], [True, False, True], [False, True, True], [True, True], [False, False]]
    assert out[schema.TEXTS].to_pylist() == [["a", "b"], ["same", "other"], ["dup", "x", "y"], ["low", "z"], ["w"]]
    # keep=web scores synthetic captions but keeps none of them, whatever k.
    web_only = keep_top_k(rows, k=2, keep="web")
    assert web_only[schema.SYNTHETIC_KEEP].to_pylist() == [[False] * len(r["syn"]) for r in rows]
    assert web_only[schema.CAPTION_KEEP].to_pylist() == [False, False, True, False, True]


def test_named_scorers_gate_with_their_thresholds_and_rank_by_name():
    """A text passes ITM and every named scorer with a threshold (a null score fails); a scorer
    without one stores its scores only; top-k may rank by a scorer's name."""
    rows = [{"web": "w", "web_itm": 0.9, "syn": ["s0", "s1", "s2", "s3"], "syn_itm": [0.9, 0.9, 0.9, 0.2]},
            {"web": "v", "web_itm": 0.9, "syn": ["t"], "syn_itm": [0.9]}]
    table = scored_table(rows)
    for name, web, synthetic in (("clip", [0.3, 0.1], [[0.3, 0.1, 0.25, 0.9], [None]]),
                                 ("sig", [0.01, 0.02], [[0.1, 0.9, 0.5, 0.99], [0.5]])):
        table = table.append_column(schema.score_column(name), pa.array(web, pa.float32()))
        table = table.append_column(schema.synthetic_score_column(name),
                                    pa.array(synthetic, pa.list_(pa.float32())))
    scorers = (ScorerConfig(name="clip", model="M", threshold=0.2), ScorerConfig(name="sig", model="S"))
    cfg = RunConfig(filter=FilterConfig(threshold=0.5), scorers=scorers)
    out = KeepPolicy(cfg)(table)
    assert out[schema.CAPTION_KEEP].to_pylist() == [True, False]  # v: CLIP 0.1 < 0.2
    assert out[schema.SYNTHETIC_KEEP].to_pylist() == [[True, False, True, False], [False]]  # t: CLIP null
    assert out[schema.TEXTS].to_pylist() == [["w", "s0", "s2"], []]
    ranked = KeepPolicy(dataclasses.replace(cfg, filter=FilterConfig(threshold=0.5, top_k_synthetic=1,
                                                                      rank_synthetic_by="sig")))
    # s2 has the best SigLIP of the two that pass (s0, s2)
    assert ranked(table)[schema.SYNTHETIC_KEEP].to_pylist()[0] == [False, False, True, False]
    with pytest.raises(ValueError, match="run.filter.rank_synthetic_by: 'nope' is not one of"):
        KeepPolicy(dataclasses.replace(cfg, filter=FilterConfig(rank_synthetic_by="nope")))


def test_top_k_must_not_be_negative():
    with pytest.raises(ConfigError, match="run.filter.top_k_synthetic"):
        check(RunConfig(filter=FilterConfig(top_k_synthetic=-1)), "run")


def test_a_filter_of_another_side_decodes_at_its_own(tmp_path, blip_dirs, prepared):
    from tests.tiny_blip import save_filter

    other = save_filter(tmp_path / "filter48", image_size=48)
    cfg = dataclasses.replace(run_config(blip_dirs), filter=FilterConfig(model=str(other)))
    assert load_image_spec(other).size == 48
    scorer = Filter(cfg)
    assert scorer.blip.spec.size == 48
    captioner = Captioner(cfg)
    two_pools = scorer(captioner(prepared))
    k = cfg.caption.num_captions
    assert [len(g) for g in two_pools[schema.SYNTHETIC_ITM].to_pylist()[:5]] == [k] * 5
    assert CaptionAndFilter(cfg)(prepared).equals(two_pools)  # one decode at both sides, the same numbers


@pytest.mark.parametrize("arrow_type", [pa.binary(), pa.large_binary()])
def test_binary_captions_are_prepared_per_row(arrow_type):
    text, invalid = utf8_text(pa.chunked_array([pa.array(["café".encode(), None, b"ok \xff"], arrow_type)]))
    assert text.to_pylist() == ["café", None, "ok \ufffd"] and invalid == [False, False, True]
    assert text.type == (pa.large_string() if arrow_type == pa.large_binary() else pa.string())


def test_invalid_utf8_in_a_string_column_is_found():
    text, invalid = utf8_text(string_array_unchecked([b"fine", b"\xc3(", b""]))
    assert text.to_pylist() == ["fine", "\ufffd(", ""] and invalid == [False, True, False]
    text.validate(full=True)
    valid = pa.array(["a", None])
    assert utf8_text(valid) == (valid, [False, False])  # the common case is passed through


def test_decode_fails_bad_captions_and_takes_null_status_as_downloaded(cfg):
    rows = shard_rows("u", 3, failed=0, corrupt=0)
    rows[1]["status"] = None
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    captions = string_array_unchecked([b"a photo", b"a photo", b"bad \xff"])
    table = table.set_column(INPUT_SCHEMA.get_field_index("caption"), "caption", captions)
    out = Prepare(cfg)(table)
    assert out[schema.ERROR].to_pylist() == [None, None, BAD_UTF8]
    assert out["caption"].to_pylist() == ["a photo", "a photo", "bad \ufffd"]


def test_a_blip_folder_as_named_scorer_gives_the_filter_columns(cfg, captioner, scorer, prepared, blip_dirs):
    """run.scorers entries of the filter's own folder: kind auto is ITM, kind itc ITC, the very
    numbers of caption_itm / caption_itc (the same text preparation, dtype and decoded pixels)."""
    folder = str(blip_dirs["filter"])
    named = dataclasses.replace(cfg, scorers=(ScorerConfig(name="m", model=folder),
                                              ScorerConfig(name="c", model=folder, kind="itc")))
    captioned = captioner(prepared)
    out = Filter(named)(captioned)
    assert out.drop_columns([schema.score_column(n) for n in "mc"] + [schema.synthetic_score_column(n) for n in "mc"]
                            ).equals(scorer(captioned))  # the filter's own columns as without them
    for name, web, synthetic in (("m", schema.CAPTION_ITM, schema.SYNTHETIC_ITM),
                                 ("c", schema.CAPTION_ITC, schema.SYNTHETIC_ITC)):
        assert out[schema.score_column(name)].equals(out[web])
        assert out[schema.synthetic_score_column(name)].equals(out[synthetic])
    assert out[schema.CAPTION_ITM].null_count < out.num_rows


def test_without_a_blip_filter_the_itm_columns_are_null_and_the_scorers_score(cfg, captioner, scorer, prepared,
                                                                              blip_dirs, tmp_path):
    """run.filter.model "" (what a CLIP --filter becomes): no ITM or ITC; a CLIP scorer and a BLIP
    one score each text as they do beside the BLIP filter, in the fused actor as in two pools."""
    from tests.model.tiny_models import clip_dir

    scorers = (ScorerConfig(name="clip", model=str(clip_dir(tmp_path / "clip")), threshold=0.0),
               ScorerConfig(name="blip", model=str(blip_dirs["filter"])))
    alone = dataclasses.replace(cfg, filter=FilterConfig(threshold=None), scorers=scorers)
    beside = dataclasses.replace(cfg, scorers=scorers)
    captioned = captioner(prepared)
    out, reference = Filter(alone)(captioned), Filter(beside)(captioned)
    assert out.schema == reference.schema
    for column in (schema.CAPTION_ITM, schema.CAPTION_ITC, schema.SYNTHETIC_ITM, schema.SYNTHETIC_ITC):
        assert out[column].null_count == out.num_rows
    for name in ("clip", "blip"):
        for column in (schema.score_column(name), schema.synthetic_score_column(name)):
            assert out[column].equals(reference[column]), column
    assert out[schema.score_column("blip")].equals(reference[schema.CAPTION_ITM])
    assert out[schema.FILTER_ERROR].equals(reference[schema.FILTER_ERROR])
    assert CaptionAndFilter(alone)(prepared).equals(out)
    decided = KeepPolicy(alone)(out)
    web_clip = out[schema.score_column("clip")].to_pylist()
    assert decided[schema.CAPTION_KEEP].to_pylist()[:5] == [s is not None and s >= 0.0 for s in web_clip[:5]]
    assert decided[schema.THRESHOLD].null_count == decided.num_rows
