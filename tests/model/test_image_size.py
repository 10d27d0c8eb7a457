"""MED at another resolution: BLIP's bicubic interpolation of the ViT position grid (online and momentum)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capfilt.model.image_size import interpolate_pos_embed, with_image_size
from tests.tiny_blip import NARROW_TEXT, tiny_med


def bicubic(pos: torch.Tensor, side: int, new_side: int) -> torch.Tensor:
    """BLIP's interpolate_pos_embed written out: the class token kept, the grid resized."""
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim)], dim=1)


def test_interpolation_is_blips_bicubic():
    pos = torch.randn(1, 1 + 16, 8)
    torch.testing.assert_close(interpolate_pos_embed(pos, 6), bicubic(pos, 4, 6), rtol=0, atol=0)
    assert interpolate_pos_embed(pos, 4) is pos  # the same grid is left alone
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 6)


def test_with_image_size_resizes_both_grids_and_keeps_everything_else():
    model = tiny_med(seed=0, **NARROW_TEXT)
    with torch.no_grad():  # momentum copy not equal to the online one, as after training
        model.vision_m.embeddings.position_embedding.add_(1.0)
    resized = with_image_size(model, 48)
    assert resized.cfg.image_size == 48 and resized.cfg.vision_hidden == model.cfg.vision_hidden
    before, after = model.state_dict(), resized.state_dict()
    for name in ("vision.embeddings.position_embedding", "vision_m.embeddings.position_embedding"):
        assert after[name].shape == (1, 1 + 36, 64)
        torch.testing.assert_close(after[name], bicubic(before[name], 4, 6), rtol=0, atol=0)
    assert [k for k in before if "position_embedding" not in k and not torch.equal(before[k], after[k])] == []
    assert resized.vision(pixel_values=torch.randn(1, 3, 48, 48)).last_hidden_state.shape == (1, 37, 64)
    assert with_image_size(model, 32) is model
    with pytest.raises(ValueError, match="multiple of MEDConfig.patch_size=8"):
        with_image_size(model, 50)
