"""Test helpers: tiny random MEDs, tiny random transformers BLIP directories, test pictures and tiny
img2dataset-style input shards.

Not a test module. Test files import the builders from here; tests/conftest.py builds the
session fixtures (`blip_dirs`, `published_blip_dirs`) with them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # model input side of the tiny BLIPs and MEDs
BLIP_SPREAD = 0.02  # initializer_range of the tiny BLIPs, BLIP's own
# Weights 25x wider than BLIP's init spread random images apart in ITC space (distinct pictures
# stay below cosine 0.999), so duplicate detection and retrieval have something to tell apart.
WIDE_SPREAD = 0.5

# A MED small enough to take a training step in tens of milliseconds on one CPU core.
TINY_MED = dict(image_size=IMAGE_SIZE, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=2,
                vision_mlp=128, text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128, embed_dim=32,
                queue_size=64)
# The text side as small as it goes, for tests about the vision tower.
NARROW_TEXT = dict(text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, embed_dim=16, queue_size=8)

INPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("jpg", pa.binary()),
    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
])


def tokenizer():
    from capfilt.model.tokenizer import build_tokenizer

    return build_tokenizer()


def tiny_med_config(**overrides):
    """`TINY_MED` with `overrides`, as a MEDConfig."""
    from capfilt.model.med import med_config

    return med_config("tiny", **{**TINY_MED, **overrides})


def tiny_med(seed: int = 0, **overrides):
    """A random MED of `tiny_med_config(**overrides)`, initialised from `seed`."""
    import torch

    from capfilt.model.med import MED

    torch.manual_seed(seed)
    return MED(tiny_med_config(**overrides))


def vit_config(cls=None, **overrides):
    """A tiny transformers ViT config (or `cls`, e.g. DeiTConfig) shaped as TINY_MED's vision tower."""
    from transformers import ViTConfig

    return (cls or ViTConfig)(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, image_size=IMAGE_SIZE, patch_size=8), **overrides})


def bert_config(**overrides):
    """A tiny transformers BertConfig shaped as TINY_MED's text side."""
    from transformers import BertConfig

    return BertConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
                         **overrides})


def med_scores(med, pixels, input_ids, attention_mask) -> dict:
    """MED's scores of pair i = (image i, text i), through blip_ops as the pipeline scores:
    {"itm": P(match) [B] ([ENC] first), "itc": cosine [B] ([CLS] first)}."""
    import torch

    from capfilt.model import blip_ops

    owner = torch.arange(pixels.shape[0], device=pixels.device)  # [B]: pair i is image i
    with torch.no_grad():
        itm, itc = blip_ops.score(blip_ops.Towers.of(med), pixels, owner, input_ids, attention_mask,
                                  med.cfg.enc_token_id)
    return {"itm": itm, "itc": itc}


def med_greedy_ids(med, pixels, prompt_ids, max_new_tokens: int = 20, min_new_tokens: int = 0):
    """transformers' greedy `generate` on MED's own decoder after `[DEC] prompt` (`prompt_ids` [P],
    no [CLS]/[SEP]). -> the new tokens [B, <=max_new_tokens], [SEP]-terminated, [PAD]-padded."""
    import torch
    from transformers import GenerationConfig

    with torch.no_grad():
        image_embeds = med.encode_image(pixels)  # [B, 1+P, Dv]
        start = torch.tensor([med.cfg.dec_token_id], device=pixels.device)
        ids = torch.cat([start, prompt_ids.to(pixels.device)]).expand(pixels.shape[0], -1)  # [B, 1+P]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, eos_token_id=med.cfg.sep_token_id,
                               pad_token_id=med.cfg.pad_token_id, bos_token_id=med.cfg.dec_token_id)
        out = med.text_decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
    return out[:, ids.shape[1]:]  # [B, new]


def greedy(logits, uniforms):
    """A caption_decode chooser that ignores its random numbers: argmax, greedy decoding."""
    return logits.argmax(dim=-1)


def blip_config(image_size: int = IMAGE_SIZE, spread: float = BLIP_SPREAD):
    """A tiny transformers BlipConfig with the published text settings (30524 rows, bos 30522);
    `spread` is the initializer_range of both towers."""
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, initializer_range=spread)
    text = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=30522, sep_token_id=102,
                eos_token_id=2, pad_token_id=0, initializer_range=spread)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def _save(model, directory: Path, image_size: int) -> Path:
    from transformers import BlipImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def save_captioner(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE, spread: float = BLIP_SPREAD) -> Path:
    """A random BlipForConditionalGeneration directory, loadable with plain from_pretrained."""
    import torch
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return _save(BlipForConditionalGeneration(blip_config(image_size, spread)).eval(), directory, image_size)


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


def save_filter(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE, spread: float = BLIP_SPREAD) -> Path:
    """A random BlipForImageTextRetrieval directory whose ITM head spreads P(match) around 0.5."""
    import torch
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(blip_config(image_size, spread)).eval()
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


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """`img` as an encoded file of format `fmt`; `options` go to PIL's save (quality, save_all, ...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def image_bytes(seed: int, size: int = 48, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A picture (a disc on a plain background, colours and place drawn from `seed`), encoded."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(0, size // 2, 2))
    draw.ellipse([x, y, x + size // 2, y + size // 2], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return encode(img if mode == "RGB" else img.convert(mode), fmt)


def row(key: str | None, caption: str | None, jpg: bytes | None, status: str | None = None, side: int = 48,
        url: str | None = None) -> dict:
    """One img2dataset input row; without `status`, a None image is a failed download."""
    if status is None:
        status = "success" if jpg is not None else "failed_to_download"
    sizes = {"width": side, "height": side, "original_width": side, "original_height": side}
    if status != "success":
        sizes = dict.fromkeys(sizes)
    return {"key": key, "url": url or f"http://127.0.0.1/img/{key}.jpg", "caption": caption, "jpg": jpg,
            "status": status, "error_message": None if status == "success" else "timed out", **sizes}


def shard_rows(prefix: str, n: int, failed: int = 2, corrupt: int = 1, seed: int = 0) -> list[dict]:
    """`n` rows: the last `failed` failed to download, the `corrupt` before them hold broken bytes."""
    rows = []
    for i in range(n):
        jpg = image_bytes(seed * 1000 + i)
        if i >= n - failed:
            jpg = None
        elif i >= n - failed - corrupt:
            jpg = b"\xff\xd8\xff\xe0 not really a jpeg"
        rows.append(row(f"{prefix}{i:04d}", f"a photo of thing {i}", jpg, url=f"http://127.0.0.1/img/{prefix}{i}.jpg"))
    return rows


def write_shard(path: Path, rows: list[dict], schema: pa.Schema = INPUT_SCHEMA, **write_options) -> Path:
    """`rows` as one parquet file of `schema` (columns a row lacks are null); `write_options` go to
    pyarrow's write_table (row_group_size, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **write_options)
    return path
