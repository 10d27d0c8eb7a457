"""Stock transformers vs capfilt's caption and filter stages on the same inputs; prints images/s.

    python benchmarks/bench_stages.py                                # CUDA, random BLIP-base at 384 px
    python benchmarks/bench_stages.py --device cpu --size tiny       # smoke run on a laptop

Stock captioning is `BlipForConditionalGeneration.generate` (nucleus sampling, same settings);
stock filtering is `BlipForImageTextRetrieval.forward` on every (image, text) pair, once with the
ITM head and once for ITC, as a caller of the stock API does it. Weights are random (nothing is
downloaded), so captions run to max_length: both sides decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_models  # noqa: E402
from capfilt.config import CaptionConfig, FilterConfig, ResourcesConfig, RunConfig  # noqa: E402
from capfilt.images import pixel_values  # noqa: E402
from capfilt.stages.caption import Captioner  # noqa: E402
from capfilt.stages.filter import Filter  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


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
    side = captioner.spec.size
    images = np.random.default_rng(0).integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
    keys = [f"k{i}" for i in range(args.batch)]
    c = cfg.caption
    print(f"device {captioner.device} dtype {captioner.dtype} size {args.size} ({side} px) batch {args.batch} "
          f"captions/image {c.num_captions} max_length {c.max_length}")

    # --- captioning ---
    model, tok = captioner.model, captioner.tokenizer
    prompt = tok([c.prompt] * args.batch, return_tensors="pt")["input_ids"].to(captioner.device)
    pixels = pixel_values(images, captioner.spec, captioner.device, captioner.dtype)

    def stock_caption():
        with torch.no_grad():
            out = model.generate(pixel_values=pixels, input_ids=prompt.clone(), do_sample=True, top_p=c.top_p,
                                 repetition_penalty=c.repetition_penalty, min_new_tokens=c.min_length,
                                 max_new_tokens=c.max_length, num_return_sequences=c.num_captions)
        tok.batch_decode(out, skip_special_tokens=True)

    stock_s = timed(stock_caption, captioner.device.type, args.repeats)
    ours_s = timed(lambda: captioner.caption(images, keys), captioner.device.type, args.repeats)
    print(f"caption  stock generate {args.batch / stock_s:9.1f} img/s   capfilt stage {args.batch / ours_s:9.1f} img/s"
          f"   ratio {stock_s / ours_s:5.2f}x")

    # --- filtering: the web caption and K synthetic captions per image ---
    texts = [[f"a photo of a thing number {i}"] + [f"a red circle on the left of a blue background {j}"
                                                    for j in range(c.num_captions)] for i in range(args.batch)]
    blip = scorer.blip
    retrieval, ftok = blip.model, blip.tokenizer
    fpixels = pixel_values(images, blip.spec, blip.device, blip.dtype)
    owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=blip.device)
    flat = [t for group in texts for t in group]
    ids = ftok(flat, padding="longest", truncation=True, max_length=35, return_tensors="pt").to(blip.device)
    enc_ids = ids["input_ids"].clone()
    enc_ids[:, 0] = blip.enc_token_id

    def stock_filter():
        with torch.no_grad():
            per_pair = fpixels.index_select(0, owner)
            itm = retrieval(input_ids=enc_ids, attention_mask=ids["attention_mask"], pixel_values=per_pair)
            itc = retrieval(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=per_pair,
                            use_itm_head=False)
        itm.itm_score.softmax(-1)[:, 1].tolist(), itc.itm_score.diagonal().tolist()

    stock_s = timed(stock_filter, blip.device.type, args.repeats)
    ours_s = timed(lambda: scorer.score(images, texts), blip.device.type, args.repeats)
    print(f"filter   stock forward  {args.batch / stock_s:9.1f} img/s   capfilt stage {args.batch / ours_s:9.1f} img/s"
          f"   ratio {stock_s / ours_s:5.2f}x   ({len(flat)} texts)")


if __name__ == "__main__":
    main()
