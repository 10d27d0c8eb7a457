"""Starting MED's vision tower from transformers ViT / DeiT folders (tiny random ones saved here)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTModel,
                          ViTForImageClassification, ViTModel)

from capfilt.model.med import MED, med_config
from capfilt.model.vision_init import check_compatible, init_vision_from_vit
from tests import tiny_blip
from tests.tiny_blip import vit_config


def tiny_med(**overrides) -> MED:
    """The tiny MED's vision tower at 32 px, patch 8 (a 4 x 4 grid); the text side as small as it goes."""
    return tiny_blip.tiny_med(seed=1, **{**tiny_blip.NARROW_TEXT, **overrides}).eval()


def save(model, path) -> dict[str, torch.Tensor]:
    """Save as transformers does; return the tensors by the names in the file."""
    model.save_pretrained(path, safe_serialization=True)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_copied(med: MED, saved: dict[str, torch.Tensor], prefix: str) -> None:
    """Every vision tensor of `med` equals its source in the saved folder, q/k/v as BLIP's fused qkv."""
    v = med.vision
    pos = saved[prefix + "embeddings.position_embeddings"]
    if prefix + "embeddings.distillation_token" in saved:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # the distillation slot dropped
    pairs = [(v.embeddings.class_embedding, saved[prefix + "embeddings.cls_token"]),
             (v.embeddings.position_embedding, pos),
             (v.embeddings.patch_embedding.weight, saved[prefix + "embeddings.patch_embeddings.projection.weight"]),
             (v.embeddings.patch_embedding.bias, saved[prefix + "embeddings.patch_embeddings.projection.bias"]),
             (v.post_layernorm.weight, saved[prefix + "layernorm.weight"]),
             (v.post_layernorm.bias, saved[prefix + "layernorm.bias"])]
    for i, layer in enumerate(v.encoder.layers):
        b = f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([saved[f"{b}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            pairs += [(getattr(layer.self_attn.qkv, kind), qkv),
                      (getattr(layer.self_attn.projection, kind), saved[f"{b}attention.output.dense.{kind}"]),
                      (getattr(layer.layer_norm1, kind), saved[f"{b}layernorm_before.{kind}"]),
                      (getattr(layer.layer_norm2, kind), saved[f"{b}layernorm_after.{kind}"]),
                      (getattr(layer.mlp.fc1, kind), saved[f"{b}intermediate.dense.{kind}"]),
                      (getattr(layer.mlp.fc2, kind), saved[f"{b}output.dense.{kind}"])]
    for ours, theirs in pairs:
        assert torch.equal(ours.detach(), theirs)
    # The momentum ViT starts from the same weights.
    for name, param in med.vision.named_parameters():
        assert torch.equal(param, dict(med.vision_m.named_parameters())[name])


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
def test_vit_folder_is_copied_and_computes_what_the_vit_computes(tmp_path, cls):
    """Same block (pre-norm attention + GELU MLP, final norm): with the same layer-norm epsilon,
    MED's vision forward is the ViT encoder's output."""
    torch.manual_seed(0)
    saved = save(cls(vit_config(layer_norm_eps=1e-6)).eval(), tmp_path)
    med = tiny_med()
    init_vision_from_vit(med, tmp_path)
    assert_copied(med, saved, "vit." if cls is ViTForImageClassification else "")
    pixels = torch.randn(2, 3, 32, 32)
    theirs = ViTModel.from_pretrained(tmp_path, use_safetensors=True).eval()(pixel_values=pixels).last_hidden_state
    ours = med.vision(pixel_values=pixels).last_hidden_state  # [2, 1 + 16, 64]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [DeiTModel, DeiTForImageClassificationWithTeacher])
def test_deit_folder_drops_the_distillation_token_and_its_position(tmp_path, cls):
    torch.manual_seed(0)
    saved = save(cls(vit_config(DeiTConfig)), tmp_path)
    prefix = "deit." if cls is DeiTForImageClassificationWithTeacher else ""
    assert saved[prefix + "embeddings.position_embeddings"].shape == (1, 2 + 16, 64)
    med = tiny_med()
    init_vision_from_vit(med, tmp_path)
    assert_copied(med, saved, prefix)
    assert med.vision.embeddings.position_embedding.shape == (1, 1 + 16, 64)


def test_a_different_grid_is_interpolated_bicubically(tmp_path, caplog):
    """A 48 px ViT (6 x 6 grid) into MED at 32 px (4 x 4): BLIP's interpolate_pos_embed. The
    layer-norm epsilon of transformers' ViT configs (1e-12) is not BLIP's: MED keeps its own."""
    torch.manual_seed(0)
    saved = save(ViTModel(vit_config(image_size=48)), tmp_path)
    med = tiny_med()
    with caplog.at_level(logging.INFO, logger="capfilt.model.vision_init"):
        init_vision_from_vit(med, tmp_path)
    pos = saved["embeddings.position_embeddings"]  # [1, 1 + 36, 64]
    grid = F.interpolate(pos[:, 1:].reshape(1, 6, 6, 64).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 64)
    torch.testing.assert_close(med.vision.embeddings.position_embedding.detach(), torch.cat([pos[:, :1], grid], 1))
    assert "6x6 interpolated bicubically to MED's 4x4" in caplog.text
    assert "layer_norm_eps is 1e-12; MED keeps vision_ln_eps=1e-06" in caplog.text
    assert med.cfg.vision_ln_eps == 1e-6  # BLIP's ViT


def test_qkv_without_bias_starts_at_zero(tmp_path):
    torch.manual_seed(0)
    save(ViTModel(vit_config(qkv_bias=False)), tmp_path)
    med = tiny_med()
    init_vision_from_vit(med, tmp_path)
    assert all(not layer.self_attn.qkv.bias.any() for layer in med.vision.encoder.layers)


def test_shape_mismatches_are_named(tmp_path):
    torch.manual_seed(0)
    save(ViTModel(vit_config()), tmp_path / "vit")
    with pytest.raises(ValueError, match="MEDConfig.vision_hidden=96 but the ViT's hidden_size is 64"):
        init_vision_from_vit(tiny_med(vision_hidden=96, vision_heads=2), tmp_path / "vit")
    with pytest.raises(ValueError, match="MEDConfig.vision_layers=3 but the ViT's num_hidden_layers is 2"):
        init_vision_from_vit(tiny_med(vision_layers=3), tmp_path / "vit")
    with pytest.raises(ValueError, match="MEDConfig.patch_size=16 but the ViT's patch_size is 8"):
        init_vision_from_vit(tiny_med(patch_size=16), tmp_path / "vit")
    # A config.json that does not describe its weights: the tensor is named with both shapes.
    config = tmp_path / "vit" / "config.json"
    config.write_text(config.read_text().replace('"intermediate_size": 128', '"intermediate_size": 96'))
    with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight: the ViT's tensor has "
                                         r"shape \[128, 64\], MED's has \[96, 64\]"):
        init_vision_from_vit(tiny_med(vision_mlp=96), tmp_path / "vit")


def test_only_whole_safetensors_are_read(tmp_path):
    torch.manual_seed(0)
    save(ViTModel(vit_config()), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # cut short
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        init_vision_from_vit(tiny_med(), tmp_path)
    weights.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        init_vision_from_vit(tiny_med(), tmp_path)


def test_base_and_large_presets_take_deit_base_and_vit_large_shapes():
    """The published folders' shapes (facebook/deit-base-patch16-224's config.json; ViT-L/16) fit
    the presets, checked without building a base-size model."""
    deit_base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     patch_size=16, image_size=224, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-12)
    vit_large = {**deit_base, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "intermediate_size": 4096}
    check_compatible(SimpleNamespace(cfg=med_config("base")), deit_base)
    check_compatible(SimpleNamespace(cfg=med_config("large")), vit_large)
    with pytest.raises(ValueError, match="MEDConfig.vision_hidden=768"):
        check_compatible(SimpleNamespace(cfg=med_config("base")), vit_large)
