"""Loading a detected family's model whole: safetensors only, native classes only, no random weights.

`from_pretrained` quietly initialises at random every weight the checkpoint lacks (a wrong
class, a remote-code layout loaded into a native class, a truncated export) and drops the ones
it has no place for; a captioner or scorer that is partly random still runs and writes plausible
nonsense. `load_checked` refuses such a folder instead, naming the first keys that did not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .families import Family
from .weights import check_safetensors

# Keys named in the error, at most; the count says how many there are.
SHOWN_KEYS = 5


def weight_files(folder: str | Path) -> list[Path]:
    """The folder's checked `*.safetensors` files; FileNotFoundError naming the pickles found instead."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found {pickles}: pickle checkpoints are refused for safety)" if pickles else ""
        raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")
    for path in files:
        check_safetensors(path)  # a torn or planted file is named, not a bare header error
    return files


def load_checked(family: Family, folder: str | Path, device: torch.device, dtype: torch.dtype) -> Any:
    """`family.class_name` from `folder` in eval mode on `device`; ValueError when any weight is
    missing, unexpected or of another shape (the model would be partly random)."""
    import transformers
    from transformers.utils import logging as hf_logging

    weight_files(folder)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the job log
    cls = getattr(transformers, family.class_name)
    model, info = cls.from_pretrained(str(folder), use_safetensors=True, dtype=dtype, output_loading_info=True)
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in info.get(what) or [])
        if keys:
            problems.append(f"{len(keys)} {what.replace('_', ' ')} (e.g. {keys[:SHOWN_KEYS]})")
    if problems:
        raise ValueError(f"{folder}: its weights do not fit {family.class_name}: {'; '.join(problems)}; "
                         "refusing a partly random model")
    return model.to(device).eval()


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A processor's tensors on `device`, floating ones (pixels) in the model's dtype."""
    return {name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in inputs.items()}
