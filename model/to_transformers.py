"""Export a MED as the two stock transformers BLIP models CapFilt runs.

- captioner: `BlipForConditionalGeneration` = vision encoder + image-grounded text decoder;
- filter: `BlipForImageTextRetrieval` = vision encoder + text encoder + projections + ITM head.

Each directory holds config.json, model.safetensors, the tokenizer files, the processor files
(preprocessor_config.json with the model's image size and CLIP mean/std) and loads with plain
`from_pretrained`, no custom code. The MED's weights are copied by name into a freshly built
transformers model with a strict load, so a renamed or missing tensor fails the export rather
than leaving random weights behind.

The exported filter scores ITM correctly only with `[ENC]` as the first token (as BLIP was
trained); transformers' `BlipProcessor` puts `[CLS]` there, so replace `input_ids[:, 0]` with
the tokenizer's `[ENC]` id for `use_itm_head=True` and keep `[CLS]` for the ITC cosine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor,
                          GenerationConfig)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from .med import MED, text_config, vision_config


def blip_config(med: MED) -> BlipConfig:
    """The transformers BlipConfig describing `med`'s vision and text towers."""
    cfg = med.cfg
    return BlipConfig(
        text_config=text_config(cfg).to_dict(),
        vision_config=vision_config(cfg).to_dict(),
        image_text_hidden_size=cfg.embed_dim,
        label_smoothing=cfg.label_smoothing,
    )


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": tensor for name, tensor in module.state_dict().items()}


def _write(hf_model: torch.nn.Module, state: dict[str, torch.Tensor], med: MED, tokenizer,
           directory: str | Path) -> None:
    hf_model.load_state_dict(state, strict=True)
    hf_model.eval()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(directory, safe_serialization=True)
    side = med.cfg.image_size
    # The PIL backend: it needs no torchvision; it saves as "BlipImageProcessor" like the stock one.
    image_processor = BlipImageProcessorPil(size={"height": side, "width": side},
                                            image_mean=list(med.cfg.image_mean), image_std=list(med.cfg.image_std))
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    # processor_config.json embeds it too; the standalone file is what older transformers read.
    image_processor.save_pretrained(directory)


def export_captioner(med: MED, tokenizer, directory: str | Path) -> None:
    """Write `med`'s vision encoder + decoder as a `BlipForConditionalGeneration` directory."""
    config = blip_config(med)
    hf = BlipForConditionalGeneration(config)
    state = {**_prefixed("vision_model.", med.vision), **_prefixed("text_decoder.", med.text_decoder)}
    hf.generation_config = GenerationConfig(
        bos_token_id=med.cfg.dec_token_id, eos_token_id=med.cfg.sep_token_id, pad_token_id=med.cfg.pad_token_id,
        max_new_tokens=20, min_new_tokens=5,  # BLIP's captioning lengths
    )
    _write(hf, state, med, tokenizer, directory)


def export_filter(med: MED, tokenizer, directory: str | Path) -> None:
    """Write `med`'s vision encoder + text encoder + ITC projections + ITM head as `BlipForImageTextRetrieval`."""
    hf = BlipForImageTextRetrieval(blip_config(med))
    state = {
        **_prefixed("vision_model.", med.vision), **_prefixed("text_encoder.", med.text_encoder),
        **_prefixed("vision_proj.", med.vision_proj), **_prefixed("text_proj.", med.text_proj),
        **_prefixed("itm_head.", med.itm_head),
    }
    _write(hf, state, med, tokenizer, directory)
