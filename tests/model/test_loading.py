"""The whole-load check: a folder whose weights do not fit its class, or that holds pickles, is refused."""

from __future__ import annotations

import pytest
import torch

from capfilt.model.families import detect
from capfilt.model.loading import load_checked
from tests.model import tiny_models

CPU = torch.device("cpu")


def test_whole_load_check_refuses_missing_weights_and_pickles(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_models.clip_dir(tmp_path / "clip")
    family = detect(folder)
    assert load_checked(family, folder, CPU, torch.float32).training is False
    weights = load_file(folder / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit CLIPModel: 1 missing keys .*visual_projection.weight"):
        load_checked(family, folder, CPU, torch.float32)
    (folder / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        load_checked(family, folder, CPU, torch.float32)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*pickle checkpoints are refused"):
        load_checked(family, folder, CPU, torch.float32)
