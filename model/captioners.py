"""Captioners that run through transformers' `generate`: BLIP-2, InstructBLIP and the
image-text-to-text families (families.GENERATE_CAPTIONERS), each with its own processor.

`caption(images, keys)` takes decoded RGB pictures and their row keys and gives K captions per
picture (`num_captions`):

- the prompt: a processor with a chat template gets `prompt` as the instruction of one user turn
  holding the image (the template's generation prompt appended); one without (BLIP-2, PaliGemma,
  Florence-2) gets `prompt` as text, and inserts its image tokens itself. A prompt that leaves no
  image token in the input is refused (the model would caption nothing);
- batching: one processor call and one `generate` per batch, never one per image; the tokenizer
  pads on the left so every row's new tokens start at the same position (dynamic-resolution
  families give pictures different numbers of image tokens);
- sampling (`beam` false): K rows per picture, and each row's token at step t is drawn from
  `nucleus(top_p, top_k)` (caption_decode.py, BLIP's CapFilt sampler) with the row's own uniform
  from row_seeds.py, so row `key`'s k-th caption does not depend on the batch it ran in (up to the
  float rounding that padding changes). transformers' sampling draws from one generator for the
  whole batch, so `RowSampler` chooses the token as a logits processor (after repetition penalty
  and the minimum length, as BLIP's loop does) and hands `generate` a score row with one finite
  entry, which its own sampling then picks with certainty;
- beam search (`beam` true): `num_beams` (at least K) beams, the K best returned, deterministic;
- lengths count new tokens (`min_length`, `max_length` -> `min_new_tokens`, `max_new_tokens`);
  the prompt is never part of a caption;
- cleaning: special tokens dropped, whitespace runs (a chat model's newlines) made one space,
  then BLIP's `pre_caption` (text.py) to `MAX_WORDS` words, as BLIP cleans its captions.

The checkpoint's generation_config.json still applies to everything not set here (e.g. a
`no_repeat_ngram_size`). The vision tower runs once per returned row (generate expands the inputs
K-fold before the forward); BLIP's own captioner (capfilt/stages/caption.py) shares one image
encoding between its K captions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .caption_decode import Chooser, nucleus
from .families import Family, detect, expect_role
from .hub import model_name
from .loading import load_checked, to_device
from .row_seeds import row_seed, row_uniforms
from .text import pre_caption

# Words a caption keeps after cleaning: BLIP's `pre_caption` cap for its pre-training captions.
MAX_WORDS = 30

# Families whose transformers processor carries a video processor (which needs torchvision); a
# captioner loads them without it (`image_only`), as it only ever passes pictures.
VIDEO_PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "smolvlm")

# Side of the blank picture the prompt is tried on when a captioner loads.
PROBE_SIDE = 32

# Families whose processor takes one list of pictures per text.
NESTED_IMAGE_FAMILIES = ("idefics3", "smolvlm")


class CaptionOptions(Protocol):
    """The settings a captioner reads; capfilt's `CaptionConfig` (run.caption.*) has them all."""

    prompt: str  # chat instruction, or the text prompt of a processor without chat template
    num_captions: int  # K captions per image
    top_p: float
    top_k: int  # 0: the whole vocabulary
    repetition_penalty: float
    min_length: int  # new tokens before end-of-sequence is allowed
    max_length: int  # new tokens at most
    beam: bool  # beam search instead of seeded sampling
    num_beams: int  # raised to num_captions if smaller
    seed: int  # combined with each row's key


class RowSampler:
    """A `generate` logits processor that picks each row's token with the row's own uniform.

    `uniforms` [N, steps]: row n's numbers, one per new token. Returns scores [N, V] that are
    -inf except at the chosen token (0), so any later warper and the multinomial keep it.
    """

    def __init__(self, choose: Chooser, uniforms: torch.Tensor, device: torch.device):
        self.choose = choose
        self.uniforms = uniforms.to(device)  # [N, steps], uploaded once
        self.start: int | None = None  # the input length at the first step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        tokens = self.choose(scores.float(), self.uniforms[:, step])  # [N]
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)  # [N, V]


def clean_caption(text: str) -> str:
    """A decoded caption as BLIP cleans captions, after whitespace runs become one space."""
    return pre_caption(" ".join(text.split()), MAX_WORDS)


def image_only(processor_class: type) -> type:
    """`processor_class` accepting a video processor that is never used: a bare `BaseVideoProcessor`.

    transformers 5 builds these families' video processors with torchvision, and checks the type
    of each part against a registry that itself needs torchvision; captions come from pictures, so
    the video part is a placeholder and everything else is the family's own processor, loaded from
    the folder (its image processor, tokenizer, chat template and settings)."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__  # saved as the family's own
    return ImageOnly


def load_processor(folder: str | Path, family: Family) -> Any:
    """The folder's own processor (no remote code); the video-processor families' without their
    video part (`image_only`), so they need no torchvision."""
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if family.model_type == "smolvlm" and importlib.util.find_spec("num2words") is None:
        raise ValueError(f"{folder}: the smolvlm processor needs num2words (it writes its video frames' "
                         "timestamps), which is not installed: pip install num2words")
    if family.model_type not in VIDEO_PROCESSOR_FAMILIES:
        return AutoProcessor.from_pretrained(str(folder))  # remote code stays off (the default)
    from transformers.video_processing_utils import BaseVideoProcessor

    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[family.model_type])
    return image_only(processor_class).from_pretrained(str(folder), video_processor=BaseVideoProcessor())


class GenerateCaptioner:
    """A loaded captioner folder of a `generate` family; `name` its folder's (hub.model_name)."""

    def __init__(self, folder: str | Path, options: CaptionOptions, device: torch.device,
                 dtype: torch.dtype = torch.float32, family: Family | None = None):
        family = expect_role(family or detect(folder), "captioner", folder)
        if family.kind != "generate":
            raise ValueError(f"{folder}: {family.class_name} captions with BLIP's own decoder "
                             "(capfilt/stages/caption.py), not through generate")
        for key, least in (("num_captions", 1), ("max_length", 1), ("min_length", 0), ("top_k", 0)):
            if getattr(options, key) < least:
                raise ValueError(f"run.caption.{key} must be at least {least}, got {getattr(options, key)}")
        self.folder, self.family, self.options = str(folder), family, options
        self.name = model_name(folder)
        self.device, self.dtype = device, dtype
        self.model: Any = load_checked(family, folder, device, dtype)
        self.processor = load_processor(folder, family)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # every row's new tokens start at the same position
        self.text = self.prompt_text(options.prompt)
        config = self.model.config
        self.image_token_id = next((getattr(config, name) for name in ("image_token_id", "image_token_index")
                                    if getattr(config, name, None) is not None), None)
        self.inputs([Image.new("RGB", (PROBE_SIDE, PROBE_SIDE))])  # a prompt that cannot work fails at load

    def prompt_text(self, prompt: str) -> str:
        """The text given to the processor with each picture: the chat turn, or the prompt itself."""
        if not getattr(self.processor, "chat_template", None):
            if self.family.model_type == "paligemma" and self.processor.image_token not in prompt:
                # Its processor would insert the image token itself, warning on every batch.
                return self.processor.image_token + prompt
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, images: list[Image.Image]) -> dict:
        """One processor call for the batch: left-padded ids and the family's pixel inputs, on device."""
        pictures = [[image] for image in images] if self.family.model_type in NESTED_IMAGE_FAMILIES else images
        hint = ("put the processor's image token in run.caption.prompt or give the processor a chat template")
        try:
            batch = self.processor(images=pictures, text=[self.text] * len(images), padding=True,
                                   return_tensors="pt")
        except ValueError as err:  # e.g. LLaVA's count of image tokens against pictures
            raise ValueError(f"{self.folder}: the prompt {self.text!r} does not fit the processor ({err}); "
                             f"{hint}") from err
        batch.pop("labels", None)  # PaliGemma's processor adds training labels; generate needs none
        ids = batch["input_ids"]  # [B, T]
        if self.image_token_id is not None and not bool((ids == self.image_token_id).any(dim=1).all()):
            raise ValueError(f"{self.folder}: the prompt {self.text!r} leaves no image token in the input; {hint}")
        return to_device(batch, self.device, self.dtype)

    @torch.no_grad()
    def generate_ids(self, images: list[Image.Image], keys: list[str], greedy: bool = False) -> torch.Tensor:
        """New token ids [B * K, T] (row n: caption n % K of picture n // K); `greedy` gives one row
        per picture by argmax, as the family's own `generate(do_sample=False)` does."""
        options = self.options
        k = options.num_captions
        inputs = self.inputs(images)
        lengths = dict(max_new_tokens=options.max_length, min_new_tokens=options.min_length,
                       repetition_penalty=options.repetition_penalty)
        if greedy:
            how = dict(do_sample=False, num_beams=1)
        elif options.beam:
            how = dict(do_sample=False, num_beams=max(options.num_beams, k), num_return_sequences=k)
        else:
            seeds = [row_seed(options.seed, key, j) for key in keys for j in range(k)]
            sampler = RowSampler(nucleus(options.top_p, options.top_k), row_uniforms(seeds, options.max_length),
                                 self.device)
            how = dict(do_sample=True, num_beams=1, num_return_sequences=k, logits_processor=[sampler])
        out = self.model.generate(**inputs, **lengths, **how)  # [B * K, T0 + new] or [B * K, 1 + new]
        # A decoder-only model returns the prompt first, an encoder-decoder its decoder's start token.
        start = 1 if self.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        return out[:, start:]  # [B * K, new]

    def caption(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        """Decoded RGB pictures and their row keys -> K cleaned captions per picture."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if not images:
            return []
        k = self.options.num_captions
        texts = self.tokenizer.batch_decode(self.generate_ids(images, keys), skip_special_tokens=True)
        captions = [clean_caption(text) for text in texts]
        return [captions[i * k : (i + 1) * k] for i in range(len(images))]
