"""Contrastive scorers: CLIP cosine and SigLIP/SigLIP2 sigmoid probability, for any number of
texts per image.

`score(images, texts)` takes decoded RGB pictures and each picture's texts (its web caption and
synthetic ones) and gives one float per text:

- CLIP (`CLIPModel`): the cosine of the projected, L2-normalised image and text embeddings, in
  [-1, 1]; what `logits_per_image / logit_scale` is;
- SigLIP and SigLIP2 (`SiglipModel`, `Siglip2Model`): sigmoid(exp(logit_scale) * cosine +
  logit_bias), the model's own probability that the pair matches, in [0, 1].

Batched: all pictures through the vision tower once, all texts through the text tower once (one
padded batch), then one dot product per text with its own picture's embedding. The model's own
processor resizes and normalises the pictures (each family has its sizes). Texts are scored as
given (CLIP's tokenizer lowercases, SigLIP's is cased), cut to `CHARS_PER_TOKEN` characters per
position first so a megabyte caption costs what a normal one does, then truncated by the tokenizer
to the text tower's positions. SigLIP texts are padded to those positions, as SigLIP was trained:
its text tower pools the last position, so padding to the batch's longest text would change
every score.

BLIP's ITM and ITC stay in blip_ops.py behind capfilt/embed.py's `Blip` (its own image
preprocessing and `[ENC]` handling); capfilt/scoring.py puts both kinds behind one scorer interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .families import Family, detect, expect_role
from .hub import model_name
from .loading import load_checked, to_device
from .text import CHARS_PER_TOKEN


class ContrastiveScorer:
    """A loaded CLIP or SigLIP folder; `kind` is "clip" or "siglip", `name` its folder's (hub.model_name)."""

    def __init__(self, folder: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                 family: Family | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer

        family = expect_role(family or detect(folder), "scorer", folder)
        if family.kind not in ("clip", "siglip"):
            raise ValueError(f"{folder}: {family.class_name} is not a contrastive scorer (CLIP or SigLIP)")
        self.kind = family.kind
        self.name = model_name(folder)
        self.device, self.dtype = device, dtype
        self.model: Any = load_checked(family, folder, device, dtype)
        self.image_processor = AutoImageProcessor.from_pretrained(str(folder))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings [B, E], fp32."""
        pixels = to_device(self.image_processor(images=images, return_tensors="pt"), self.device, self.dtype)
        return F.normalize(self.model.get_image_features(**pixels).pooler_output.float(), dim=-1)  # [B, E]

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, E], fp32."""
        cut = [text[: self.max_tokens * CHARS_PER_TOKEN] for text in texts]
        padding = "max_length" if self.kind == "siglip" else True  # SigLIP pools the last position
        tokens = self.tokenizer(cut, padding=padding, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        inputs = {name: tokens[name].to(self.device) for name in ("input_ids", "attention_mask") if name in tokens}
        if self.kind == "siglip":
            inputs.pop("attention_mask", None)  # SigLIP attends over its padding, as trained
        return F.normalize(self.model.get_text_features(**inputs).pooler_output.float(), dim=-1)  # [N, E]

    def pair_scores(self, cosine: torch.Tensor) -> torch.Tensor:
        """Cosines [N] -> this kind's scores [N]: the cosine itself, or SigLIP's probability."""
        if self.kind == "clip":
            return cosine
        scale, bias = self.model.logit_scale.float(), self.model.logit_bias.float()
        return torch.sigmoid(cosine * scale.exp() + bias)  # [N]

    def score(self, images: list[Image.Image], texts: list[list[str]]) -> list[list[float]]:
        """Decoded RGB pictures and each one's texts -> each text's score, in the same nesting."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but texts for {len(texts)}")
        flat = [text for group in texts for text in group]
        if not flat:
            return [[] for _ in texts]
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)  # [N]
        image_embeds = self.image_features(images)  # [B, E]
        text_embeds = self.text_features(flat)  # [N, E]
        cosine = (text_embeds * image_embeds[owner]).sum(dim=-1)  # [N]
        scores = self.pair_scores(cosine).tolist()
        out, start = [], 0
        for group in texts:
            out.append(scores[start : start + len(group)])
            start += len(group)
        return out
