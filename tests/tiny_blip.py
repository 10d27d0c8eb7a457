"""Test helpers: tiny random transformers BLIP directories and tiny img2dataset-style input shards.

Not a test module. Test files import the builders (and the fixtures at the bottom) from here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # model input side of the tiny BLIPs

INPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("jpg", pa.binary()),
    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
])


def tokenizer():
    from capfilt.model.tokenizer import build_tokenizer

    return build_tokenizer()


def blip_config(image_size: int = IMAGE_SIZE):
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, initializer_range=0.02)
    text = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=30522, sep_token_id=102,
                eos_token_id=2, pad_token_id=0)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def _save(model, directory: Path, image_size: int) -> Path:
    from transformers import BlipImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def save_captioner(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return _save(BlipForConditionalGeneration(blip_config(image_size)).eval(), directory, image_size)


def stop_early(model, eos_boost: float = 0.3, cross_gain: float = 8.0):
    """Make a tiny random captioner's greedy captions end at different steps per image, in place.

    A random decoder barely looks at the image and almost never ends a caption: scaling the
    cross-attention values makes its logits depend on the image, and a small boost of the
    end-of-sequence logit ([SEP]) makes some images end early and others not at all.
    """
    import torch

    with torch.no_grad():
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight *= cross_gain
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] += eos_boost
    return model


def sharpen_attention(model, gain: float = 4.0):
    """Scale every attention query and key projection of a tiny random BLIP by `gain`, in place.

    Random init gives near-uniform attention, under which a wrong query, mask or head order
    changes almost nothing; sharper attention makes such mistakes show in the outputs.
    """
    import torch
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlipTextSelfAttention):
                for proj in (module.query, module.key):
                    proj.weight *= gain
                    proj.bias *= gain
            elif isinstance(module, BlipAttention):  # fused qkv: queries then keys then values
                width = module.embed_dim
                module.qkv.weight[: 2 * width] *= gain
                module.qkv.bias[: 2 * width] *= gain
    return model


def save_early_captioner(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return _save(stop_early(BlipForConditionalGeneration(blip_config(image_size)).eval()), directory, image_size)


def save_filter(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    import torch
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(blip_config(image_size)).eval()
    _spread_itm(model, image_size)
    return _save(model, directory, image_size)


def _spread_itm(model, image_size: int) -> None:
    """Re-fit the random ITM head so P(match) spreads over (0, 1) around 0.5 on probe inputs.

    A random tiny BLIP gives every pair nearly the same score; with this, a 0.5 threshold keeps
    some texts and rejects others, so routing is exercised both ways.
    """
    import torch

    tok = tokenizer()
    texts = [f"a photo of thing {i}" for i in range(8)] + ["click here", "a red ball", "x y z", "stock 4k"]
    ids = tok(texts, padding=True, return_tensors="pt")
    ids["input_ids"][:, 0] = tok.convert_tokens_to_ids("[ENC]")
    pixels = torch.randn(len(texts), 3, image_size, image_size)
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
        cls = out.question_embeds[:, 0, :]  # [N, H]
        direction = torch.randn(cls.shape[1])
        centred = (cls - cls.mean(0)) @ direction  # [N]
        scale = 2.0 / centred.std()
        model.itm_head.weight.zero_()
        model.itm_head.weight[1] = direction * scale
        model.itm_head.bias.zero_()
        model.itm_head.bias[1] = -(cls.mean(0) @ direction) * scale


# --- The published layout: tiny random models in folders laid out as the Salesforce transformers
# ones (Salesforce/blip-itm-base-coco, blip-image-captioning-base): the plain bert-base-uncased
# tokenizer (30522 tokens, no [DEC]/[ENC]) beside a text embedding of 30524 rows, bos_token_id
# 30522 (blip_config's text settings are those of the published configs), and their processor
# files: preprocessor_config.json as BlipProcessor saved it, the tokenizer's vocab.txt and
# special_tokens_map.json, both configs naming processor_class BlipProcessor.

BERT_VOCAB_SIZE = 30522  # bert-base-uncased, what the published tokenizers hold


def published_tokenizer():
    from capfilt.model.tokenizer import build_bert_tokenizer

    return build_bert_tokenizer()


def _save_published(model, directory: Path, image_size: int) -> Path:
    import json
    import shutil

    from capfilt.model.image_norm import IMAGE_MEAN, IMAGE_STD
    from capfilt.model.tokenizer import bert_vocab_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok = published_tokenizer()
    tok.save_pretrained(directory)
    shutil.copyfile(bert_vocab_file(), directory / "vocab.txt")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(processor_class="BlipProcessor", tokenizer_class="BertTokenizer", do_lower_case=True,
                  name_or_path="bert-base-uncased")
    config_path.write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
         "unk_token": "[UNK]"}, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(IMAGE_MEAN),
        "image_processor_type": "BlipImageProcessor", "image_std": list(IMAGE_STD),
        "processor_class": "BlipProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size}}, indent=2))
    return directory


def save_published_captioner(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return _save_published(BlipForConditionalGeneration(blip_config(image_size)).eval(), directory, image_size)


def save_published_filter(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """A random filter whose ITM head spreads P(match) for `[ENC]` (30523) first, as BLIP's was trained."""
    import torch
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(blip_config(image_size)).eval()
    _spread_itm_on_pictures(model, image_size)
    return _save_published(model, directory, image_size)


def _spread_itm_on_pictures(model, image_size: int) -> None:
    """Fit the ITM head so P(match) of `[ENC]`-first pairs spreads around 0.5 on pictures like the
    test shards' (`image_bytes`), so equal scores mean something and a 0.5 threshold cuts both ways."""
    import torch

    tok = published_tokenizer()
    texts = [f"a photo of thing {i}" for i in range(8)] + ["click here", "a red ball", "x y z", "stock 4k"]
    ids = tok(texts, padding=True, return_tensors="pt")
    ids["input_ids"][:, 0] = 30523  # BLIP's [ENC]
    pictures = [Image.open(io.BytesIO(image_bytes(500 + i))).convert("RGB").resize((image_size, image_size))
                for i in range(len(texts))]
    pixels = torch.tensor(np.stack(pictures), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    pixels = (pixels - 0.45) / 0.27  # roughly the CLIP normalisation
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
        state = out.question_embeds[:, 0, :]  # [N, H]
        direction = torch.randn(state.shape[1])
        centred = (state - state.mean(0)) @ direction  # [N]
        scale = 1.5 / centred.std()
        model.itm_head.weight.zero_()
        model.itm_head.weight[1] = direction * scale
        model.itm_head.bias.zero_()
        model.itm_head.bias[1] = -(state.mean(0) @ direction) * scale


def image_bytes(seed: int, size: int = 48, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(0, size // 2, 2))
    draw.ellipse([x, y, x + size // 2, y + size // 2], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def shard_rows(prefix: str, n: int, failed: int = 2, corrupt: int = 1, seed: int = 0) -> list[dict]:
    """`n` rows: the last `failed` failed to download, the `corrupt` before them hold broken bytes."""
    rows = []
    for i in range(n):
        row = {"key": f"{prefix}{i:04d}", "url": f"http://127.0.0.1/img/{prefix}{i}.jpg",
               "caption": f"a photo of thing {i}", "jpg": image_bytes(seed * 1000 + i), "status": "success",
               "error_message": None, "width": 48, "height": 48, "original_width": 48, "original_height": 48}
        if i >= n - failed:
            row.update(jpg=None, status="failed_to_download", error_message="timed out",
                       width=None, height=None, original_width=None, original_height=None)
        elif i >= n - failed - corrupt:
            row.update(jpg=b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append(row)
    return rows


def write_shard(path: Path, rows: list[dict], schema: pa.Schema = INPUT_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture(scope="session")
def blip_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"captioner": dir, "filter": dir}: tiny random BLIPs saved with safetensors."""
    root = tmp_path_factory.mktemp("blip")
    return {"captioner": save_captioner(root / "captioner"), "filter": save_filter(root / "filter")}


@pytest.fixture(scope="session")
def published_blip_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"captioner": dir, "filter": dir}: tiny random BLIPs in the published Salesforce folder layout."""
    root = tmp_path_factory.mktemp("published")
    return {"captioner": save_published_captioner(root / "captioner"),
            "filter": save_published_filter(root / "filter", seed=1)}
