"""Which model a transformers folder holds: its family, its role and the class that loads it.

The family comes from the folder's `config.json` alone (`model_type`, `architectures`), before
any weights are read, so a wrong folder fails in the driver with one clear line:

- scorers: CLIP (`CLIPModel`, cosine), SigLIP and SigLIP2 (`SiglipModel`, `Siglip2Model`, sigmoid
  probability), BLIP retrieval (`BlipForImageTextRetrieval`, ITM/ITC through capfilt/embed.py);
- captioners: BLIP (`BlipForConditionalGeneration`, the static-buffer decoder of
  caption_decode.py), and every family below through its own class and processor with
  transformers' `generate` (captioners.py): BLIP-2, InstructBLIP, Florence-2, Qwen2-VL,
  Qwen2.5-VL, Idefics3, SmolVLM, LLaVA, LLaVA-NeXT, PaliGemma.

A config with `auto_map` whose `model_type` transformers does not ship needs
remote code, which is refused (the code would come from the checkpoint). One whose
`model_type` is native loads with the native class, never the remote one; `load_checked` then
refuses it if its weights do not fit that class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> the class that scores with it and the kind of score (scorers.py).
SCORER_CLASSES = {
    "clip": ("CLIPModel", "clip"),
    "siglip": ("SiglipModel", "siglip"),
    "siglip2": ("Siglip2Model", "siglip"),
}

# model_type of the captioners that run through transformers' `generate` (captioners.py); the
# class is transformers' image-text-to-text one for that model_type.
GENERATE_CAPTIONERS = ("blip-2", "instructblip", "florence2", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm",
                       "llava", "llava_next", "paligemma")


@dataclass(frozen=True)
class Family:
    """What a folder's config.json says it is."""

    model_type: str  # config.json's, e.g. "clip", "qwen2_vl"
    role: str  # "scorer" or "captioner"
    class_name: str  # the transformers class that loads it, e.g. "SiglipModel"
    kind: str  # scorers: "clip", "siglip", "blip-itm"; captioners: "blip" (static decoder) or "generate"


def read_config(folder: str | Path) -> dict:
    """`folder/config.json` as a dict; FileNotFoundError or ValueError naming the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs config.json and *.safetensors")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def supported() -> str:
    """The families this module loads, for error messages."""
    return (f"scorers {sorted(SCORER_CLASSES)} and blip (BlipForImageTextRetrieval); captioners blip "
            f"(BlipForConditionalGeneration) and {list(GENERATE_CAPTIONERS)}")


def detect(folder: str | Path) -> Family:
    """The family of the model in `folder`, from its config.json; ValueError for one not supported
    (naming the folder, its model_type and what is supported) or one that needs remote code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = read_config(folder)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in CONFIG_MAPPING_NAMES:
        if "auto_map" in config:
            raise ValueError(f"{folder}: model_type {model_type!r} is not part of transformers and its config.json "
                             f"asks for remote code (auto_map {sorted(config['auto_map'])}); running a checkpoint's "
                             "own code is refused for safety: use a checkpoint converted to a family transformers "
                             "ships natively")
        raise ValueError(f"{folder}: model_type {model_type!r} is not a transformers model; "
                         f"supported: {supported()}")
    if model_type in SCORER_CLASSES:
        class_name, kind = SCORER_CLASSES[model_type]
        return Family(model_type, "scorer", class_name, kind)
    if model_type == "blip":
        if "BlipForImageTextRetrieval" in architectures:
            return Family(model_type, "scorer", "BlipForImageTextRetrieval", "blip-itm")
        if "BlipForConditionalGeneration" in architectures:
            return Family(model_type, "captioner", "BlipForConditionalGeneration", "blip")
        raise ValueError(f"{folder}: a BLIP folder must be BlipForImageTextRetrieval (a filter) or "
                         f"BlipForConditionalGeneration (a captioner); its architectures are {architectures}")
    if model_type in GENERATE_CAPTIONERS:
        return Family(model_type, "captioner", MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type], "generate")
    raise ValueError(f"{folder}: model_type {model_type!r} is not a supported captioner or scorer; "
                     f"supported: {supported()}")


def expect_role(family: Family, role: str, folder: str | Path) -> Family:
    """`family` when it plays `role`; else ValueError naming the folder (a scorer given as captioner...)."""
    if family.role != role:
        raise ValueError(f"{folder}: {family.class_name} ({family.model_type}) is a {family.role}, not a {role}")
    return family
