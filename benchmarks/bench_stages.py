"""Stock transformers vs capfilt's vision tower, caption and filter stages on the same inputs.

    python benchmarks/bench_stages.py                                    # CUDA, random BLIP-base at 384 px
    python benchmarks/bench_stages.py --device cpu --size base --batch 4 --repeats 1
    python benchmarks/bench_stages.py --device cpu --size tiny --json /tmp/stages.json
    python benchmarks/bench_stages.py --device cpu --families 8 32 --repeats 2  # every family, batched vs a loop

Baselines, run in the same process on the same inputs:
- vision: the stock `BlipVisionModel` (eager attention) vs the same weights with SDPA attention;
- caption: stock `BlipForConditionalGeneration.generate` (eager, nucleus sampling with the same
  top_k/top_p/penalty/lengths) vs the captioner stage;
- filter: stock modules with each image encoded once (vision once per image, the text encoder
  on every text against its image, ITM head and ITC projections: the strong baseline) vs the
  filter stage (SDPA vision tower, ITM and ITC in one text pass with each image's
  cross-attention K/V projected once, texts bucketed by length).
Weights are random (nothing is downloaded), so captions run to max_length: both sides decode the
same number of tokens. FLOPs per image (matmul-like ops, torch.utils.flop_counter, attention
counted through the math kernel) and the captioner's ATen ops per image (about one kernel launch
each on a GPU) come from one image at the same settings; on CUDA the host syncs of a caption
batch are counted too (torch.cuda.set_sync_debug_mode).

`--families B [B ...]` instead compares, at each batch size B, every captioner family (BLIP and
tiny_models.CAPTIONERS: BLIP-2, InstructBLIP, LLaVA, LLaVA-NeXT, Idefics3, SmolVLM, Florence-2, PaliGemma,
Qwen2-VL, Qwen2.5-VL) and every scorer
(BLIP ITM, CLIP, SigLIP, SigLIP2), random models of one shape (FAMILY_SHAPE), against the loop
Data-Juicer runs (its image captioning mapper and image-text matching/similarity filters):
- captioners: capfilt's path (BLIP: the captioner stage; the others: model/captioners.py's
  GenerateCaptioner, one processor call and one left-padded `generate` per batch) vs the family's
  processor and `generate` once per picture, the same sampling settings; every caption is
  `--max-length` tokens long on both sides (min = max), so both decode the same tokens;
- scorers: capfilt's path (BLIP: the filter stage's ITM and ITC in one text pass; CLIP/SigLIP:
  model/scorers.py's ContrastiveScorer, one vision and one text pass per batch) vs the model's
  processor and forward once per (picture, text) pair (BLIP: the ITM head only, as Data-Juicer
  asks for, so the loop computes less than the stage). Two texts per picture (a web caption and a
  synthetic one). Both sides include the processors' resizing and tokenising (BLIP: the uint8
  picture's normalisation; the pipeline resizes it while decoding, outside the stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from tests.model import tiny_models  # noqa: E402
from capfilt.config import CaptionConfig, FilterConfig, ResourcesConfig, RunConfig  # noqa: E402
from capfilt.embed import load_model  # noqa: E402
from capfilt.images import pixel_values  # noqa: E402
from capfilt.model.captioners import NESTED_IMAGE_FAMILIES, GenerateCaptioner  # noqa: E402
from capfilt.model.loading import to_device  # noqa: E402
from capfilt.model.scorers import ContrastiveScorer  # noqa: E402
from capfilt.stages.caption import Captioner  # noqa: E402
from capfilt.stages.filter import Filter  # noqa: E402


def timed_pair(stock, ours, device: str, repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall and process-CPU seconds of each, after a warm-up of each, timed in turn.

    Alternating the two spreads a shared machine's load changes over both; the CPU seconds
    (all threads of this process) move less with other processes' load than the wall time.
    """
    stock(), ours()
    best = {"stock": [float("inf")] * 2, "ours": [float("inf")] * 2}
    for _ in range(repeats):
        for name, fn in (("stock", stock), ("ours", ours)):
            if device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = [min(best[name][0], time.perf_counter() - wall), min(best[name][1], time.process_time() - cpu)]
    return {name: tuple(v) for name, v in best.items()}


def flops(fn) -> int:
    """Matmul-like FLOPs of one call, attention through the math kernel so the counter sees it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def dispatched_ops(fn) -> int:
    """ATen ops one call dispatches: on a GPU each is about one kernel launch, a host cost per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count(), torch.no_grad():
        fn()
    return Count.ops


def host_syncs(fn, device: str) -> int | None:
    """CUDA host syncs of one call (torch.cuda.set_sync_debug_mode warnings); None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def compare(name: str, batch: int, stock, ours, device: str, repeats: int, label: str = "capfilt") -> dict:
    """Times `stock` and `ours` on the same batch; prints and returns images/s and their ratio."""
    times = timed_pair(stock, ours, device, repeats)
    (stock_s, stock_cpu), (ours_s, ours_cpu) = times["stock"], times["ours"]
    line = (f"{name:8s} stock {batch / stock_s:9.2f} img/s   {label} {batch / ours_s:9.2f} img/s"
            f"   ratio {stock_s / ours_s:5.2f}x")
    out = {"stock_img_s": batch / stock_s, f"{label}_img_s": batch / ours_s, "ratio": stock_s / ours_s}
    if device == "cpu":
        line += f"   (by CPU time {stock_cpu / ours_cpu:5.2f}x)"
        out["ratio_cpu_time"] = stock_cpu / ours_cpu
    print(line, flush=True)
    return out


class StockFilter:
    """The strong stock baseline: stock (eager) modules, each image through the vision tower once."""

    def __init__(self, scorer: Filter):
        from transformers import BlipForImageTextRetrieval

        self.model = load_model(BlipForImageTextRetrieval, scorer.cfg.model, scorer.blip.device, scorer.blip.dtype)
        self.scorer = scorer

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, owner: torch.Tensor, ids: dict, enc_ids: torch.Tensor):
        model = self.model
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # [B, P, D]
        per_text = embeds.index_select(0, owner)  # [N, P, D]
        fused = model.text_encoder(input_ids=enc_ids, attention_mask=ids["attention_mask"],
                                   encoder_hidden_states=per_text).last_hidden_state
        itm = model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1]
        text = model.text_encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        text_feat = F.normalize(model.text_proj(text[:, 0]).float(), dim=-1)
        image_feat = F.normalize(model.vision_proj(embeds[:, 0]).float(), dim=-1)
        return itm.tolist(), (image_feat.index_select(0, owner) * text_feat).sum(-1).tolist()


# The --families models: 64-px pictures in 8-px patches (64 image tokens), towers 128 wide with 2
# layers (language models 4), as --size tiny's BLIP: each family's batch runs in seconds on a CPU
# while the per-call costs of a loop (processor, generate's setup, Python) stay in proportion.
FAMILY_SHAPE = tiny_models.Shape(side=64, patch=8, width=128, layers=2, heads=4, llm_heads=4)
CAPTIONER_FAMILIES = tiny_models.CAPTIONERS
SCORER_FAMILIES = {"clip": tiny_models.clip_dir, "siglip": tiny_models.siglip_dir, "siglip2": tiny_models.siglip2_dir}
# Web-sized pictures of several aspect ratios, which each processor resizes to its model's input.
PICTURE_SIZES = ((96, 72), (64, 96), (80, 80), (120, 90))
# Each picture's texts: a web caption and a synthetic one, words of the tiny tokenizer's vocabulary.
PAIR_TEXTS = ["a photo of the image in one picture", "a picture of the photo"]


def time_against_loop(family: str, batch: int, ours, loop, device: str, repeats: int) -> dict:
    """Times the batched path and the per-item loop on the same batch; prints one table row."""
    times = timed_pair(loop, ours, device, repeats)
    (loop_s, loop_cpu), (ours_s, ours_cpu) = times["stock"], times["ours"]
    row = {"family": family, "batch": batch, "ours_img_s": batch / ours_s, "loop_img_s": batch / loop_s,
           "ratio": loop_s / ours_s, "ratio_cpu_time": loop_cpu / ours_cpu}
    print(f"| {family:13s} | {batch:5d} | {row['ours_img_s']:9.2f} | {row['loop_img_s']:9.2f} | "
          f"{row['ratio']:5.2f}x | {row['ratio_cpu_time']:5.2f}x |", flush=True)
    return row


def families(args, models: Path) -> list[dict]:
    """Every captioner and scorer family: capfilt's batched path vs a loop per picture or pair."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and args.device == "cuda") \
        else torch.float32
    blip = save_models("tiny", models / "blip")  # --size tiny's BLIP: FAMILY_SHAPE's sizes
    cfg = RunConfig(caption=CaptionConfig(model=str(blip["captioner"]), min_length=args.max_length,
                                          max_length=args.max_length),
                    filter=FilterConfig(model=str(blip["filter"])), resources=ResourcesConfig(dtype=args.dtype))
    c = cfg.caption
    print(f"device {args.device} dtype {dtype} torch threads {torch.get_num_threads()}; one caption of "
          f"{c.max_length} tokens per picture, "
          f"{len(PAIR_TEXTS)} texts per picture; img/s: pictures per second; ratio: loop time / ours "
          "(wall; then process CPU time)\n", flush=True)
    print("| family        | batch | ours img/s | loop img/s | ratio | by CPU |\n|---|---|---|---|---|---|")
    folders = {name: build(models / name, shape=FAMILY_SHAPE) for name, (build, _) in CAPTIONER_FAMILIES.items()}
    folders |= {name: build(models / name, shape=FAMILY_SHAPE) for name, build in SCORER_FAMILIES.items()}
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

    captioner, scorer = Captioner(cfg), Filter(cfg)
    stock_captioner = load_model(BlipForConditionalGeneration, c.model, captioner.device, captioner.dtype)
    stock_filter = load_model(BlipForImageTextRetrieval, cfg.filter.model, scorer.blip.device, scorer.blip.dtype)
    tok = captioner.tokenizer
    rows = []
    for batch in args.families:
        keys = [f"k{i}" for i in range(batch)]
        pictures = tiny_models.pictures(batch, sizes=PICTURE_SIZES)
        side = captioner.spec.size
        images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        texts = [list(PAIR_TEXTS) for _ in range(batch)]

        def blip_loop(images=images):
            prompt = tok([c.prompt], return_tensors="pt")["input_ids"].to(captioner.device)
            with torch.no_grad():
                for i in range(len(images)):
                    one = pixel_values(images[i : i + 1], captioner.spec, captioner.device, captioner.dtype)
                    out = stock_captioner.generate(pixel_values=one, input_ids=prompt, do_sample=True, top_p=c.top_p,
                                                   top_k=c.top_k, repetition_penalty=c.repetition_penalty,
                                                   min_new_tokens=c.min_length, max_new_tokens=c.max_length)
                    tok.batch_decode(out, skip_special_tokens=True)

        rows.append(time_against_loop("blip", batch, lambda images=images, keys=keys: captioner.caption(
            pixel_values(images, captioner.spec, captioner.device, captioner.dtype), keys), blip_loop,
            args.device, args.repeats))
        for name, (_, prompt) in CAPTIONER_FAMILIES.items():
            model = GenerateCaptioner(folders[name], replace(c, prompt=prompt), device, dtype)

            def generate_loop(model=model, pictures=pictures):
                nested = model.family.model_type in NESTED_IMAGE_FAMILIES
                with torch.no_grad():
                    for picture in pictures:
                        inputs = model.processor(images=[[picture]] if nested else [picture], text=[model.text],
                                                 return_tensors="pt")
                        out = model.model.generate(**to_device(inputs, device, dtype), do_sample=True, top_p=c.top_p,
                                                   top_k=c.top_k, repetition_penalty=c.repetition_penalty,
                                                   min_new_tokens=c.min_length, max_new_tokens=c.max_length)
                        model.tokenizer.batch_decode(out, skip_special_tokens=True)

            rows.append(time_against_loop(name, batch, lambda model=model, pictures=pictures, keys=keys:
                                          model.caption(pictures, keys), generate_loop, args.device, args.repeats))

        def itm_loop(images=images, texts=texts):
            with torch.no_grad():
                for i, group in enumerate(texts):
                    for text in group:
                        one = pixel_values(images[i : i + 1], scorer.blip.spec, scorer.blip.device, scorer.blip.dtype)
                        ids = scorer.blip.tokenizer([text], truncation=True, max_length=cfg.filter.max_text_tokens,
                                                    return_tensors="pt").to(scorer.blip.device)
                        out = stock_filter(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                           pixel_values=one, use_itm_head=True)
                        out.itm_score.float().softmax(-1)[:, 1].item()

        rows.append(time_against_loop("blip-itm", batch, lambda images=images, texts=texts: scorer.score(
            pixel_values(images, scorer.blip.spec, scorer.blip.device, scorer.blip.dtype), texts), itm_loop,
            args.device, args.repeats))
        for name in SCORER_FAMILIES:
            model = ContrastiveScorer(folders[name], device, dtype)
            processor = AutoProcessor.from_pretrained(folders[name])
            siglip = model.kind == "siglip"

            def pair_loop(model=model, processor=processor, siglip=siglip, pictures=pictures, texts=texts):
                with torch.no_grad():
                    for picture, group in zip(pictures, texts):
                        for text in group:
                            # As transformers' docs score a pair (tests/model/test_scorers.py's `direct`).
                            inputs = dict(processor.tokenizer([text], truncation=True, max_length=model.max_tokens,
                                                              padding="max_length" if siglip else True,
                                                              return_tensors="pt"))
                            if siglip:
                                inputs.pop("attention_mask", None)  # SigLIP attends over its padding
                            inputs |= processor.image_processor(images=[picture], return_tensors="pt")
                            logits = model.model(**to_device(inputs, device, dtype)).logits_per_image
                            logits.float().item()

            rows.append(time_against_loop(name, batch, lambda model=model, pictures=pictures, texts=texts:
                                          model.score(pictures, texts), pair_loop, args.device, args.repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["base", "tiny"], default="base")
    parser.add_argument("--batch", type=int, default=64, help="images per call")
    parser.add_argument("--num-captions", type=int, default=1, help="synthetic captions per image")
    parser.add_argument("--max-length", type=int, default=20, help="new tokens per caption")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=None, help="folder to keep the random models in")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--families", type=int, nargs="+", metavar="BATCH",
                        help="instead: every captioner and scorer family, batched vs a per-item loop, at these "
                             "batch sizes")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick CUDA whenever they see it
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu")

    if args.families:
        report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "max_length": args.max_length, "repeats": args.repeats,
                  "families": families(args, args.models or Path(tempfile.mkdtemp(prefix="capfilt-bench-")))}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        return
    models = save_models(args.size, args.models or Path(tempfile.mkdtemp(prefix="capfilt-bench-")))
    cfg = RunConfig(caption=CaptionConfig(model=str(models["captioner"]), num_captions=args.num_captions,
                                          max_length=args.max_length, min_length=min(5, args.max_length)),
                    filter=FilterConfig(model=str(models["filter"])),
                    resources=ResourcesConfig(dtype=args.dtype))
    captioner, scorer = Captioner(cfg), Filter(cfg)
    device = captioner.device.type
    side = captioner.spec.size
    images = np.random.default_rng(0).integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
    keys = [f"k{i}" for i in range(args.batch)]
    c = cfg.caption
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(captioner.dtype), "size": args.size, "image_size": side, "batch": args.batch,
              "num_captions": c.num_captions, "max_length": c.max_length, "repeats": args.repeats,
              "torch": torch.__version__}
    print(f"device {report['device']} dtype {captioner.dtype} size {args.size} ({side} px) batch {args.batch} "
          f"captions/image {c.num_captions} max_length {c.max_length}", flush=True)

    # --- captioning: stock generate on a stock (eager) model vs the stage ---
    from transformers import BlipForConditionalGeneration

    stock = load_model(BlipForConditionalGeneration, c.model, captioner.device, captioner.dtype)
    tok = captioner.tokenizer
    pixels = pixel_values(images, captioner.spec, captioner.device, captioner.dtype)

    def stock_caption(pixels=pixels):
        with torch.no_grad():
            prompt = tok([c.prompt] * len(pixels), return_tensors="pt")["input_ids"].to(captioner.device)
            out = stock.generate(pixel_values=pixels, input_ids=prompt, do_sample=True, top_p=c.top_p,
                                 top_k=c.top_k, repetition_penalty=c.repetition_penalty,
                                 min_new_tokens=c.min_length, max_new_tokens=c.max_length,
                                 num_return_sequences=c.num_captions)
        return tok.batch_decode(out, skip_special_tokens=True)

    # --- vision tower: stock eager vs SDPA (the captioner's tower is swapped already) ---
    with torch.no_grad():
        report["vision"] = compare("vision", args.batch, lambda: stock.vision_model(pixel_values=pixels),
                                   lambda: captioner.model.vision_model(pixel_values=pixels), device,
                                   args.repeats, "sdpa")
    report["caption"] = compare("caption", args.batch, stock_caption, lambda: captioner.caption(pixels, keys),
                                device, args.repeats)
    report["caption"]["host_syncs_per_batch"] = {"stock": host_syncs(stock_caption, device),
                                                 "capfilt": host_syncs(lambda: captioner.caption(pixels, keys),
                                                                       device)}

    # --- filtering: the web caption and K synthetic captions per image ---
    texts = [[f"a photo of a thing number {i}"] + [f"a red circle on the left of a blue background {j}"
                                                    for j in range(c.num_captions)] for i in range(args.batch)]
    baseline = StockFilter(scorer)
    fpixels = pixel_values(images, scorer.blip.spec, scorer.blip.device, scorer.blip.dtype)
    owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=scorer.blip.device)
    flat = [t for group in texts for t in group]
    ids = scorer.blip.tokenizer(flat, padding="longest", truncation=True, max_length=35,
                           return_tensors="pt").to(scorer.blip.device)
    enc_ids = ids["input_ids"].clone()
    enc_ids[:, 0] = scorer.blip.enc_token_id
    # The stage as the pipeline runs it: SDPA vision tower, the fused text pass (capfilt.model.text_pass).
    report["filter"] = compare("filter", args.batch, lambda: baseline(fpixels, owner, ids, enc_ids),
                               lambda: scorer.score(fpixels, texts), device, args.repeats)
    report["filter"]["texts"] = len(flat)
    report["filter"]["bucket_tokens"] = scorer.cfg.bucket_tokens

    if not args.no_flops:
        one_owner = owner[owner == 0]
        one_ids = {k: v[: len(one_owner)] for k, v in ids.items()}
        counts = {
            "caption_stock": flops(lambda: stock_caption(pixels[:1])),
            "caption_capfilt": flops(lambda: captioner.caption(pixels[:1], keys[:1])),
            "filter_stock": flops(lambda: baseline(fpixels[:1], one_owner, one_ids, enc_ids[: len(one_owner)])),
            "filter_capfilt": flops(lambda: scorer.score(fpixels[:1], texts[:1])),
            "vision": flops(lambda: stock.vision_model(pixel_values=pixels[:1])),
        }
        report["gflop_per_image"] = {k: v / 1e9 for k, v in counts.items()}
        print("GFLOP per image: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in counts.items()), flush=True)
        ops = {"stock": dispatched_ops(lambda: stock_caption(pixels[:1])),
               "capfilt": dispatched_ops(lambda: captioner.caption(pixels[:1], keys[:1]))}
        report["caption"]["aten_ops_per_image"] = ops
        print(f"caption ATen ops per image: stock {ops['stock']}, capfilt {ops['capfilt']}", flush=True)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
