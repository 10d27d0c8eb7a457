"""Stock transformers vs capfilt's vision tower, caption and filter stages on the same inputs.

    python benchmarks/bench_stages.py                                    # CUDA, random BLIP-base at 384 px
    python benchmarks/bench_stages.py --device cpu --size base --batch 4 --repeats 1
    python benchmarks/bench_stages.py --device cpu --size tiny --json /tmp/stages.json

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from capfilt.config import CaptionConfig, FilterConfig, ResourcesConfig, RunConfig  # noqa: E402
from capfilt.embed import load_model  # noqa: E402
from capfilt.images import pixel_values  # noqa: E402
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
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick CUDA whenever they see it
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu")

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
