"""Start MED's vision transformer from an ImageNet ViT or DeiT, as BLIP starts its ViT.

BLIP's ViT-B/16 starts from DeiT-base (deit_base_patch16_224) and its ViT-L/16 from timm's
ImageNet-21k ViT-L/16 (blip_pretrain.py). `init_vision_from_vit` reads a transformers folder of
either family, config.json + model.safetensors (safetensors only, checked by model/weights.py),
written by `ViTModel`, `ViTForImageClassification` (facebook/deit-base-patch16-224 is one),
`DeiTModel` or a `DeiTForImageClassification*`, and copies it into MED's `BlipVisionModel`:

    ViT / DeiT (the names saved files use)          BlipVisionModel
    embeddings.cls_token                            embeddings.class_embedding
    embeddings.position_embeddings                  embeddings.position_embedding
    embeddings.patch_embeddings.projection          embeddings.patch_embedding
    layer.i.attention.attention.{query,key,value}   layers.i.self_attn.qkv (q, k, v stacked: BLIP's fused qkv)
    layer.i.attention.output.dense                  layers.i.self_attn.projection
    layer.i.layernorm_before / layernorm_after      layers.i.layer_norm1 / layer_norm2
    layer.i.intermediate.dense / output.dense       layers.i.mlp.fc1 / fc2
    layernorm                                       post_layernorm

Left out: DeiT's distillation token and its position slot (row 1: BLIP's DeiT start is the
plain, undistilled model), the pooler and any classification head. The block is the same
computation in both (pre-norm attention and GELU MLP, one final norm), so a ViT folder and MED's
tower compute the same features up to the differences handled here:

- layer-norm epsilon: transformers' ViT/DeiT configs say 1e-12 (a default of their conversion);
  the timm models the weights come from, and BLIP's ViT, use 1e-6. MED keeps its own
  `MEDConfig.vision_ln_eps` (1e-6, BLIP's) and logs the difference.
- position grid: the folder's (224 / 16 = 14 for DeiT-base) is interpolated bicubically to MED's
  (`model.image_size.interpolate_pos_embed`, BLIP's interpolate_pos_embed) when they differ.
- `qkv_bias: false` folders: BLIP's qkv has biases; they start at zero.

Width, depth, heads, MLP width, patch size, channels and activation must match; a mismatch is a
ValueError naming the MEDConfig field (or the folder's key) and both shapes. The momentum ViT is
re-synchronised afterwards, so the EMA starts from the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .image_size import grid_side, interpolate_pos_embed
from .med import MED
from .weights import pretrained_folder

log = logging.getLogger(__name__)


def check_compatible(model: MED, vit_config: dict) -> None:
    """Refuse a ViT whose shapes do not fit `model`'s vision tower, naming the MEDConfig field."""
    cfg = model.cfg
    wanted = {"vision_hidden": "hidden_size", "vision_layers": "num_hidden_layers",
              "vision_heads": "num_attention_heads", "vision_mlp": "intermediate_size", "patch_size": "patch_size"}
    for field, key in wanted.items():
        if getattr(cfg, field) != vit_config.get(key):
            raise ValueError(f"MEDConfig.{field}={getattr(cfg, field)} but the ViT's {key} is {vit_config.get(key)}")
    if vit_config.get("num_channels", 3) != 3:
        raise ValueError(f"the ViT takes num_channels={vit_config['num_channels']} channels; MED takes RGB (3)")
    if vit_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"the ViT's hidden_act is {vit_config['hidden_act']!r}; BLIP's ViT uses 'gelu'")


def _copy(target: torch.Tensor, source: torch.Tensor, key: str) -> None:
    if target.shape != source.shape:
        raise ValueError(f"{key}: the ViT's tensor has shape {list(source.shape)}, MED's has {list(target.shape)}")
    target.copy_(source)


@torch.no_grad()
def init_vision_from_vit(model: MED, vit_dir: str | Path) -> None:
    """Copy a transformers ViT / DeiT folder's weights into `model.vision` (and its momentum copy)."""
    from safetensors import safe_open

    vit_config, weights_path = pretrained_folder(vit_dir, "ViT")
    check_compatible(model, vit_config)
    with safe_open(str(weights_path), framework="pt") as weights:
        names = set(weights.keys())
        prefix = next((p for p in ("vit.", "deit.", "") if f"{p}embeddings.cls_token" in names), None)
        if prefix is None:
            raise ValueError(f"{weights_path} holds no ViT (no embeddings.cls_token under vit., deit. or the root)")

        def tensor(name: str) -> torch.Tensor:
            if prefix + name not in names:
                raise ValueError(f"{weights_path} lacks {prefix + name}")
            return weights.get_tensor(prefix + name)

        emb = model.vision.embeddings
        _copy(emb.class_embedding, tensor("embeddings.cls_token"), "embeddings.cls_token")
        _copy(emb.patch_embedding.weight, tensor("embeddings.patch_embeddings.projection.weight"),
              "embeddings.patch_embeddings.projection.weight")
        _copy(emb.patch_embedding.bias, tensor("embeddings.patch_embeddings.projection.bias"),
              "embeddings.patch_embeddings.projection.bias")
        positions = tensor("embeddings.position_embeddings")  # [1, 1 (+1 DeiT) + G*G, D]
        if prefix + "embeddings.distillation_token" in names:
            positions = torch.cat([positions[:, :1], positions[:, 2:]], dim=1)  # the distillation slot out
        side, own_side = grid_side(positions.shape[1] - 1), model.cfg.image_size // model.cfg.patch_size
        if side != own_side:
            log.info("ViT position grid %dx%d interpolated bicubically to MED's %dx%d", side, side, own_side, own_side)
            positions = interpolate_pos_embed(positions, own_side)
        _copy(emb.position_embedding, positions, "embeddings.position_embeddings")

        for i, layer in enumerate(model.vision.encoder.layers):
            block = f"encoder.layer.{i}."
            attention = block + "attention.attention."
            for kind in ("weight", "bias"):
                qkv = getattr(layer.self_attn.qkv, kind)  # [3D, D] / [3D]: q, k, v rows, as BLIP's fused qkv
                if kind == "bias" and f"{prefix}{attention}query.bias" not in names:
                    qkv.zero_()  # qkv_bias: false
                    continue
                _copy(qkv, torch.cat([tensor(f"{attention}{n}.{kind}") for n in ("query", "key", "value")]),
                      f"{attention}{{query,key,value}}.{kind}")
            for ours, theirs in ((layer.self_attn.projection, "attention.output.dense"),
                                 (layer.layer_norm1, "layernorm_before"), (layer.layer_norm2, "layernorm_after"),
                                 (layer.mlp.fc1, "intermediate.dense"), (layer.mlp.fc2, "output.dense")):
                _copy(ours.weight, tensor(f"{block}{theirs}.weight"), f"{block}{theirs}.weight")
                _copy(ours.bias, tensor(f"{block}{theirs}.bias"), f"{block}{theirs}.bias")
        _copy(model.vision.post_layernorm.weight, tensor("layernorm.weight"), "layernorm.weight")
        _copy(model.vision.post_layernorm.bias, tensor("layernorm.bias"), "layernorm.bias")
    eps = vit_config.get("layer_norm_eps")
    if eps is not None and eps != model.cfg.vision_ln_eps:
        log.info("the ViT's layer_norm_eps is %g; MED keeps vision_ln_eps=%g (BLIP's ViT)",
                 eps, model.cfg.vision_ln_eps)
    for param, param_m in model._momentum_pairs():
        param_m.copy_(param)
