"""MED at another input resolution: BLIP's bicubic interpolation of the ViT position grid.

BLIP pre-trains at 224 px and fine-tunes the captioner and the filter at 384 px. A ViT's patch
embedding and blocks do not depend on the resolution; its position embedding does (one vector
per patch of a square grid, plus the class token's). BLIP's `interpolate_pos_embed`
(models/vit.py, used by blip.py `load_checkpoint` for the online and the momentum ViT) keeps the
class token's vector and resizes the grid with `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`; `interpolate_pos_embed` here does exactly that on transformers'
`BlipVisionEmbeddings.position_embedding` layout [1, 1 + G*G, D].
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .med import MED


def grid_side(num_patches: int) -> int:
    """The side of a square patch grid, or ValueError."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} position embeddings do not form a square grid")
    return side


def interpolate_pos_embed(pos_embed: torch.Tensor, new_side: int, num_extra: int = 1) -> torch.Tensor:
    """[1, E + G*G, D] -> [1, E + S*S, D]: the E extra tokens' vectors kept, the G x G grid
    resized to S x S bicubically (BLIP's interpolate_pos_embed); unchanged when G == S."""
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]  # [1, E, D], [1, G*G, D]
    side = grid_side(grid.shape[1])
    if side == new_side:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, G, G]
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim)  # [1, S*S, D]
    return torch.cat([extra, grid], dim=1)


def with_image_size(model: MED, image_size: int) -> MED:
    """A MED for `image_size` px inputs with `model`'s weights, the online and momentum position
    grids interpolated (BLIP resizes both); `model` itself is returned when the size is its own."""
    cfg = model.cfg
    if image_size == cfg.image_size:
        return model
    if image_size <= 0 or image_size % cfg.patch_size:
        raise ValueError(f"image size {image_size} is not a positive multiple of MEDConfig.patch_size={cfg.patch_size}")
    resized = MED(dataclasses.replace(cfg, image_size=image_size))
    side = image_size // cfg.patch_size
    state = model.state_dict()
    for name in ("vision.embeddings.position_embedding", "vision_m.embeddings.position_embedding"):
        state[name] = interpolate_pos_embed(state[name], side)
    resized.load_state_dict(state, strict=True)
    return resized.train(model.training)
