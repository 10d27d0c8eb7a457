"""MED training throughput (`model.train.train`, one process); prints steady-state images/s.

    python benchmarks/bench_train.py                                  # tiny MED on demo-world rows, CPU
    python benchmarks/bench_train.py --size base --batch-size 32 --steps 20   # GPU machine (bf16)
    python benchmarks/bench_train.py --set train.num_workers=4 --set train.randaug_ops=0

Runs 2 x --steps optimiser steps and reports the second half only, so start-up, the first
DataLoader batch and CUDA warm-up are not in the figure. Checkpoints are off until the end.

Model FLOPs per sample are counted by `torch.utils.flop_counter` on one forward + backward of a
real batch (every pass: momentum encoders, the three text passes, ITM's 3B pairs), so MFU =
FLOPs per sample x images/s / --peak-tflops (989: H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capfilt.config import DemoConfig, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="parquet folder (default: generated demo-world human rows)")
    parser.add_argument("--rows", type=int, default=400, help="demo-world rows when --data is not given")
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="measured optimiser steps (as many run first)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and checkpoints")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="device peak for MFU (H100 SXM dense bf16: 989)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()

    import torch

    from capfilt.model.med import MED, med_config
    from capfilt.model.train import build_dataset, train

    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-bench-train-"))
    data = args.data
    if data is None:
        from capfilt.demo_world import write_world

        write_world(DemoConfig(num_human=args.rows, num_web=0, num_test=0), work / "demo", overwrite=True)
        data = str(work / "demo" / "human")
    cfg = load_config(None, [f"model.size={args.size}", *args.overrides])
    train_cfg = replace(cfg.train, batch_size=args.batch_size, max_steps=2 * args.steps, log_every=args.steps,
                        ckpt_every=10 ** 9, warmup_steps=0)
    model = MED(med_config(cfg.model.size, **cfg.model.overrides))
    dataset = build_dataset([data], train_cfg, model.cfg.image_size)
    flops = flops_per_sample(model, dataset, train_cfg)
    out = work / f"run-{args.size}"
    train(model, dataset, train_cfg, out, resume=False)
    steady = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"size {args.size}  device {device}  batch {args.batch_size}  threads {torch.get_num_threads()}  "
          f"workers {train_cfg.num_workers}")
    print(f"train: {steady['images_per_s']:.1f} images/s over steps {args.steps + 1}-{2 * args.steps} "
          f"(loss {steady['loss']:.3f})")
    achieved = flops * steady["images_per_s"] / 1e12
    print(f"model FLOPs {flops / 1e9:.1f} GFLOP per sample; {achieved:.2f} TFLOP/s; "
          f"MFU {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s")


def flops_per_sample(model, dataset, cfg) -> float:
    """Forward + backward FLOPs of one training step on a real batch, per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from capfilt.model.data import Collator
    from capfilt.model.tokenizer import build_tokenizer
    from capfilt.model.train import bf16_is_native

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train() runs
    model.to(device).train()
    batch = Collator(build_tokenizer(), cfg.max_text_len)([dataset[(i, 0)] for i in range(cfg.batch_size)])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and bf16_is_native(device))
    with FlopCounterMode(display=False) as counter, autocast:
        out = model(batch["pixel_values"].to(device), batch["input_ids"].to(device),
                    batch["attention_mask"].to(device), batch["idx"].to(device), alpha=0.4)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / cfg.batch_size


if __name__ == "__main__":
    main()
