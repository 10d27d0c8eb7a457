"""Loading a BLIP folder for scoring: the model, its tokenizer, its `[DEC]`/`[ENC]` ids, its image preprocessing.

Models are transformers directories: a captioner is a `BlipForConditionalGeneration`, a filter a
`BlipForImageTextRetrieval`, loaded with `from_pretrained(use_safetensors=True)` (no pickle, no
remote code; every weights file checked first), attention swapped to SDPA (`capfilt.model.sdpa`).
The filter stage, calibration, `capfilt eval` and `capfilt dedup` all load through `load_filter`;
the features and scores themselves are
`capfilt.model.blip_ops`'s (see there for what ITM and ITC compute). `load_model` is the one safe
`from_pretrained` of every model folder, the captioner stage's too: the stages import it from here,
so this module imports no stage (tests/test_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from capfilt.images import ImageSpec, load_image_spec, pixel_values, resize_uint8
from capfilt.model import blip_ops
from capfilt.model.sdpa import use_sdpa
from capfilt.model.weights import check_safetensors


def load_model(cls: type, model_id: str, device: torch.device, dtype: torch.dtype) -> Any:
    """`from_pretrained` with safetensors only and no remote code, in eval mode on `device`."""
    if not model_id:
        raise ValueError(f"no model directory given for {cls.__name__} (--captioner / --filter)")
    from transformers.utils import logging as hf_logging

    for weights in sorted(Path(model_id).glob("*.safetensors")):
        check_safetensors(weights)  # a torn or planted file is named, not a bare header error
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the job log
    model = cls.from_pretrained(model_id, use_safetensors=True, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id)


@dataclass
class Blip:
    """A loaded BLIP directory: the model, its tokenizer, task-token ids and image preprocessing."""

    model: Any  # BlipForImageTextRetrieval or BlipForConditionalGeneration, eval mode
    tokenizer: Any
    spec: ImageSpec  # input side and normalisation, from preprocessor_config.json
    device: torch.device
    dtype: torch.dtype  # the model's weights and its pixel inputs
    path: str
    dec_token_id: int  # decoder's first token (blip_ops.special_token_ids)
    enc_token_id: int  # ITM's first token (blip_ops.special_token_ids)

    @property
    def towers(self) -> blip_ops.Towers:
        return blip_ops.Towers.of(self.model)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, S, S] normalised pixel values of decoded images, resized as the decode stage resizes."""
        batch = np.stack([resize_uint8(img, self.spec.size) for img in images])  # [B, S, S, 3] uint8
        return pixel_values(batch, self.spec, str(self.device), self.dtype)

    def image_features(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ITM image embeddings [B, P, D], normalised ITC features [B, E]) of decoded images."""
        return blip_ops.image_side(self.towers, self.pixels(images))

    def tokenize(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts prepared as the filter scores them -> ([N, T] ids, [CLS] first; [N, T] mask)."""
        return blip_ops.tokenize(self.tokenizer, texts, max_tokens, self.device)


def _load(directory: str | Path, cls_name: str, device: torch.device, dtype: torch.dtype) -> Blip:
    import transformers

    if directory and not (Path(directory) / "config.json").is_file():  # none given: load_model says so
        raise FileNotFoundError(f"{directory}: not a transformers model directory (no config.json)")
    model = load_model(getattr(transformers, cls_name), str(directory), device, dtype)  # safetensors only
    use_sdpa(model)  # fused attention in the vision tower (and any stock text forward), stock's numbers
    tokenizer = load_tokenizer(str(directory))
    dec, enc = blip_ops.special_token_ids(tokenizer, model.config.text_config)
    return Blip(model, tokenizer, load_image_spec(directory), device, dtype, str(directory), dec, enc)


def load_filter(directory: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Blip:
    """A `BlipForImageTextRetrieval` directory (safetensors only)."""
    return _load(directory, "BlipForImageTextRetrieval", device, dtype)


def load_captioner(directory: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Blip:
    """A `BlipForConditionalGeneration` directory (safetensors only)."""
    return _load(directory, "BlipForConditionalGeneration", device, dtype)
