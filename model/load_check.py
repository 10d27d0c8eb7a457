"""Whether a transformers folder loads whole into a class, told from names alone.

`from_pretrained` loads a folder of another architecture, or one with a layer missing from its
weights, with those layers randomly initialised, and reports it only in a log line. Here the
folder's parameter names (safetensors headers, no tensor read) are compared with those of the
class built from the folder's config.json on the meta device (no memory allocated), as
transformers compares them, tied weights and its ignore lists aside.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .weights import check_safetensors


def architectures(directory: str | Path) -> list[str]:
    """The classes the folder's config.json names (`architectures`); without them, its `model_type`."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return list(config.get("architectures") or [config.get("model_type") or "unknown"])


def weight_names(directory: str | Path) -> set[str]:
    """Every tensor name in the folder's *.safetensors files (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(path)
        with safe_open(str(path), framework="numpy") as weights:
            names.update(weights.keys())
    return names


def load_mismatch(directory: str | Path, cls: type) -> tuple[list[str], list[str]]:
    """(missing, unexpected): parameter names `cls`, built from the folder's config.json, has and
    its weights lack (tied ones aside), and names its weights have that `cls` does not."""
    import torch

    config = cls.config_class.from_dict(json.loads((Path(directory) / "config.json").read_text()))
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    found = weight_names(directory)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    # As transformers' loader: each class's ignore lists, and position ids, a buffer older
    # checkpoints still store.
    ignore_missing = _pattern(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    ignore_unexpected = _pattern({*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                                  r"(^|\.)position_ids$"})
    missing = sorted(k for k in expected - found - tied if not (ignore_missing and ignore_missing.search(k)))
    unexpected = sorted(k for k in found - expected if not ignore_unexpected.search(k))
    # transformers renames older checkpoint layouts on load (LLaVA's language_model.model.* is
    # model.language_model.* now): names left over on both sides whose shapes pair up one for one
    # are such renames, not missing layers.
    state = model.state_dict()
    if missing and Counter(tuple(state[k].shape) for k in missing) == Counter(weight_shapes(directory, unexpected)):
        return [], []
    return missing, unexpected


def weight_shapes(directory: str | Path, names: list[str]) -> list[tuple[int, ...]]:
    """The shapes of `names` in the folder's *.safetensors files (headers only)."""
    from safetensors import safe_open

    wanted, shapes = set(names), []
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as weights:
            shapes += [tuple(weights.get_slice(k).get_shape()) for k in weights.keys() if k in wanted]
    return shapes


def _pattern(patterns) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
