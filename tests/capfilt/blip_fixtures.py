"""Tiny random transformers BLIP directories and img2dataset-style shards for the eval/dedup/report tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.tiny_blip import IMAGE_SIZE, tokenizer


def tiny_blip_config():
    from transformers import BlipConfig

    tok = tokenizer()
    # Weights 25x wider than BLIP's init spread random images apart in ITC space (distinct pictures
    # stay below cosine 0.999), so duplicate detection has something to tell apart.
    spread = 0.5
    text = dict(initializer_range=spread, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(initializer_range=spread, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)


def save_blip(model, directory: Path) -> Path:
    from transformers import BlipImageProcessorPil

    model.save_pretrained(directory, safe_serialization=True)
    tokenizer().save_pretrained(directory)
    BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def tiny_filter(directory: Path, seed: int = 0) -> Path:
    """A random BlipForImageTextRetrieval directory, loadable with plain from_pretrained."""
    import torch
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    return save_blip(BlipForImageTextRetrieval(tiny_blip_config()).eval(), directory)


def tiny_captioner(directory: Path, seed: int = 0) -> Path:
    """A random BlipForConditionalGeneration directory."""
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return save_blip(BlipForConditionalGeneration(tiny_blip_config()).eval(), directory)


def picture(seed: int, size: int = 48) -> bytes:
    """A JPEG of random coloured blocks: images from different seeds are far apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shard(path: Path, keys: list[str], captions: list[str], images: list[bytes | None],
                extra: dict[str, list] | None = None) -> Path:
    """An img2dataset-layout parquet shard; a None image is a failed download."""
    n = len(keys)
    status = ["success" if img is not None else "failed_to_download" for img in images]
    columns = {
        "key": pa.array(keys, pa.string()),
        "url": pa.array([f"https://example.com/{k}.jpg" for k in keys], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "jpg": pa.array(images, pa.binary()),
        "status": pa.array(status, pa.string()),
        "error_message": pa.array([None if s == "success" else "HTTP 404" for s in status], pa.string()),
        "width": pa.array([48] * n, pa.int64()),
        "height": pa.array([48] * n, pa.int64()),
        "original_width": pa.array([48] * n, pa.int64()),
        "original_height": pa.array([48] * n, pa.int64()),
    }
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path
