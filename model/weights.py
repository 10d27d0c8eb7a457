"""Safe weight files: a header check that names the file, shared by every loader.

safetensors' own errors ("incomplete metadata, file not fully covered") do not say which file
is torn; a pickle renamed `model.safetensors` must be refused before anything parses it.
"""

from __future__ import annotations

import json
from pathlib import Path


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError naming `path` unless it is a whole safetensors file (header and length).

    Reads the header only: a file cut short, a pickle or any other bytes fail here.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as err:  # safetensors raises its own error types for a bad header or length
        raise ValueError(f"{path} is not a valid safetensors file ({err}); refusing to load it") from err


def safe_weights(directory: str | Path, name: str = "model.safetensors") -> Path:
    """`directory/name` once `check_safetensors` passes; FileNotFoundError if it is absent, naming
    the pickle checkpoints found instead (they are refused, never unpickled)."""
    directory = Path(directory)
    weights = directory / name
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found {pickles}: pickle checkpoints are refused for safety)" if pickles else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    check_safetensors(weights)
    return weights


def pretrained_folder(directory: str | Path, kind: str) -> tuple[dict, Path]:
    """A transformers folder's `config.json` as a dict and its checked `model.safetensors`;
    `kind` ("ViT", "BERT") names the folder in the error when the config is missing."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a {kind} folder needs config.json and model.safetensors")
    weights = safe_weights(directory)
    return json.loads(config_path.read_text()), weights
