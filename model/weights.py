"""Safe weight files: a header check that names the file, shared by every loader.

safetensors' own errors ("incomplete metadata, file not fully covered") do not say which file
is torn; a pickle renamed `model.safetensors` must be refused before anything parses it.
"""

from __future__ import annotations

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
