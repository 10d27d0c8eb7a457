"""Whether a folder loads whole: names from the safetensors headers against a class built on the meta device."""

from __future__ import annotations

import shutil

import pytest
from safetensors.numpy import load_file, save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.model.load_check import architectures, load_mismatch


@pytest.mark.parametrize("layout", ["ours", "published"])
def test_a_whole_folder_has_nothing_missing_or_unexpected(layout, blip_dirs, published_blip_dirs):
    dirs = blip_dirs if layout == "ours" else published_blip_dirs
    # The captioner's LM head is tied to its word embeddings: stored once, not missing.
    assert load_mismatch(dirs["captioner"], BlipForConditionalGeneration) == ([], [])
    assert load_mismatch(dirs["filter"], BlipForImageTextRetrieval) == ([], [])
    assert architectures(dirs["captioner"]) == ["BlipForConditionalGeneration"]


def test_the_other_role_and_a_missing_layer_are_named(blip_dirs, tmp_path):
    missing, unexpected = load_mismatch(blip_dirs["filter"], BlipForConditionalGeneration)
    assert any(k.startswith("text_decoder.") for k in missing) and "itm_head.weight" in unexpected
    torn = shutil.copytree(blip_dirs["captioner"], tmp_path / "torn")
    weights = load_file(torn / "model.safetensors")
    layer = "vision_model.encoder.layers.1."
    save_file({k: v for k, v in weights.items() if not k.startswith(layer)}, torn / "model.safetensors",
              metadata={"format": "pt"})
    missing, unexpected = load_mismatch(torn, BlipForConditionalGeneration)
    assert missing == sorted(k for k in weights if k.startswith(layer)) and len(missing) > 4
    assert unexpected == []
