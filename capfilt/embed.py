"""BLIP features for evaluation and dedup: model loading, ITC image/text features, ITM P(match).

Models are transformers directories: a captioner is a `BlipForConditionalGeneration`, a filter a
`BlipForImageTextRetrieval`, loaded with `from_pretrained(use_safetensors=True)` (no pickle, no
remote code). The features are BLIP's:
- ITC image feature: vision_model -> vision_proj on the first ([CLS]) token, L2-normalised.
- ITC text feature: the text encoder WITHOUT the image ([CLS] first) -> text_proj on [CLS],
  L2-normalised; the cosine of the two is what `BlipForImageTextRetrieval(use_itm_head=False)` gives.
- ITM P(match): the text encoder with cross-attention to the image, first token `[ENC]` as the
  original BLIP does (when the tokenizer has it, else the tokenizer's [CLS]), itm_head on the first
  token, softmax, class 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from capfilt.images import ImageSpec, load_image_spec, pixel_values, resize_uint8
from capfilt.stages.common import load_model

ENC_TOKEN = "[ENC]"


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Blip:
    """A loaded BLIP directory: the model, its tokenizer and its image preprocessing."""

    model: Any  # BlipForImageTextRetrieval or BlipForConditionalGeneration, eval mode
    tokenizer: Any
    spec: ImageSpec  # input side and normalisation, from preprocessor_config.json
    device: torch.device
    path: str

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, S, S] normalised pixel values, prepared as the CapFilt pipeline prepares them."""
        batch = np.stack([resize_uint8(img, self.spec.size) for img in images])  # [B, S, S, 3] uint8
        return pixel_values(batch, self.spec, device=str(self.device))

    def first_token_for_itm(self) -> int:
        """`[ENC]` when the tokenizer has it (BLIP's ITM input), else its [CLS]."""
        enc = self.tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        return enc if enc is not None and enc != self.tokenizer.unk_token_id else self.tokenizer.cls_token_id


def _load(directory: str | Path, cls_name: str, device: torch.device) -> Blip:
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a transformers model directory (no config.json)")
    cls = getattr(transformers, cls_name)
    model = load_model(cls, str(directory), device, torch.float32)  # safetensors only, files checked
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return Blip(model, tokenizer, load_image_spec(directory), device, str(directory))


def load_filter(directory: str | Path, device: torch.device) -> Blip:
    """A `BlipForImageTextRetrieval` directory (safetensors only)."""
    return _load(directory, "BlipForImageTextRetrieval", device)


def load_captioner(directory: str | Path, device: torch.device) -> Blip:
    """A `BlipForConditionalGeneration` directory (safetensors only)."""
    return _load(directory, "BlipForConditionalGeneration", device)


@torch.no_grad()
def image_features(blip: Blip, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeds [B, L, D] for ITM cross-attention, normalised ITC features [B, E])."""
    embeds = blip.model.vision_model(pixel_values=blip.pixels(images)).last_hidden_state  # [B, L, D]
    feats = F.normalize(blip.model.vision_proj(embeds[:, 0, :]), dim=-1)  # [B, E]
    return embeds, feats


def tokenize(blip: Blip, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] input ids with [CLS] first, [B, T] attention mask), padded to the longest."""
    enc = blip.tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(blip.device), enc["attention_mask"].to(blip.device)


@torch.no_grad()
def text_features(blip: Blip, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised ITC text features [B, E]: the unimodal encoder (no image), [CLS] token."""
    hidden = blip.model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    return F.normalize(blip.model.text_proj(hidden[:, 0, :]), dim=-1)  # [B, E]


@torch.no_grad()
def itm_match(blip: Blip, image_embeds: torch.Tensor, input_ids: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """ITM P(match) [P] of pair p = (image_embeds[p] [L, D], input_ids[p] [T])."""
    ids = input_ids.clone()
    ids[:, 0] = blip.first_token_for_itm()  # [P, T]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # [P, L]
    hidden = blip.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_mask).last_hidden_state  # [P, T, H]
    return blip.model.itm_head(hidden[:, 0, :]).softmax(dim=-1)[:, 1]  # [P]
