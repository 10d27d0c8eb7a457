"""What the benchmarks share: random-weight transformers BLIP folders of a given size (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                          BlipImageProcessor)

from capfilt.model.tokenizer import build_tokenizer

# BLIP-base at 384 px as the published captioning/ITM checkpoints: ViT-B/16 + BERT-base.
SIZES = {
    "base": dict(vision=dict(image_size=384, patch_size=16, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    # 384 px as BLIP-base, but a ViT of 12x12 patches (32 px) and towers of width 64: the
    # pipeline's own CPU cost around models whose compute is small (benchmarks/bench_feed.py)
    "feed": dict(vision=dict(image_size=384, patch_size=32, hidden_size=64, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4),
                 text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)),
    "tiny": dict(vision=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                             num_hidden_layers=2, num_attention_heads=4),
                 text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)),
}


def blip_config(size: str) -> BlipConfig:
    spec = SIZES[size]
    text = dict(vocab_size=30524, bos_token_id=30522, sep_token_id=102, pad_token_id=0, **spec["text"])
    return BlipConfig(vision_config=spec["vision"], text_config=text, image_text_hidden_size=256)


def save_models(size: str, directory: Path, seed: int = 0) -> dict[str, Path]:
    """Random-weight captioner and filter folders, loadable with plain from_pretrained."""
    config = blip_config(size)
    side = config.vision_config.image_size
    tokenizer = build_tokenizer()
    dirs = {}
    for name, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        torch.manual_seed(seed)
        path = Path(directory) / name
        if not (path / "model.safetensors").is_file():
            cls(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            BlipImageProcessor(size={"height": side, "width": side}).save_pretrained(path)
        dirs[name] = path
    return dirs
