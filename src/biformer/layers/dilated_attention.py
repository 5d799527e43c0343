"""Dilated (grid) window attention (MaxViT's grid attention: Tu et al., ECCV 2022), with BRA's projections."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive_int
from ..ops.regions import image_to_regions, pad_bottom_right, regions_to_image
from .projected_attention import ProjectedAttention, padding_labels


def image_to_grid_groups(x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Group the tokens of an NHWC map that lie on one dilated ``grid_h`` x ``grid_w`` grid.

    With ``step = side // grid``, token (y, x) goes to group ``(y % step_h) * step_w + x % step_w``; inside a
    group the tokens are row-major. This is the region partition of :func:`~biformer.ops.regions.image_to_regions`
    (``grid_h`` x ``grid_w`` regions of ``step_h`` x ``step_w`` tokens) with the two token axes swapped: group
    ``i`` holds token ``i`` of every region.

    Args:
        x: (N, H, W, C) with H divisible by ``grid_h`` and W by ``grid_w``.

    Returns:
        (N, step_h * step_w, grid_h * grid_w, C).
    """
    return image_to_regions(x, grid_h, grid_w).transpose(1, 2)  # (N, regions, tokens) -> (N, tokens, regions)


def grid_groups_to_image(x: torch.Tensor, grid_h: int, grid_w: int, step_h: int, step_w: int) -> torch.Tensor:
    """Inverse of :func:`image_to_grid_groups`: (N, step_h * step_w, grid_h * grid_w, C) -> (N, H, W, C)."""
    return regions_to_image(x.transpose(1, 2), grid_h, grid_w, step_h, step_w)


class DilatedAttention(ProjectedAttention):
    """Attention among the tokens of a sparse ``grid`` x ``grid`` lattice that spans the whole map (MaxViT).

    On a side of ``n`` tokens the lattice has ``g = min(grid, n)`` points spaced by ``step = ceil(n / g)``:
    a token attends the tokens whose row differs by a multiple of ``step_h`` and whose column differs by a
    multiple of ``step_w``. The map is zero-padded at the bottom/right to ``g * step`` and padded keys are
    masked. With ``grid`` >= H and W this is :class:`~biformer.layers.GlobalAttention`.
    Cost per query: at most ``grid ** 2`` keys.

    Args:
        dim: channels; num_heads, qk_dim, qk_scale, side_dwconv as in :class:`~biformer.layers.ProjectedAttention`.
        grid: lattice points per side (>= 1).

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv)
        self.grid = check_positive_int(grid, name="grid")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        height, width = qkv.shape[1], qkv.shape[2]
        grid_h, grid_w = min(self.grid, height), min(self.grid, width)
        step_h, step_w = math.ceil(height / grid_h), math.ceil(width / grid_w)
        # The next multiple of g is g * ceil(n / g): (N, grid_h * step_h, grid_w * step_w, 2*qk_dim + C).
        qkv, pad_h, pad_w = pad_bottom_right(qkv, grid_h, grid_w)
        labels = None
        if pad_h or pad_w:
            labels = padding_labels(height, width, qkv.shape[1], qkv.shape[2], qkv.device)
            labels = image_to_grid_groups(labels, grid_h, grid_w)[0, :, :, 0]  # (groups, grid_h * grid_w)
        out = self.attend_groups(image_to_grid_groups(qkv, grid_h, grid_w), labels)  # (N, groups, g*g, C)
        out = grid_groups_to_image(out, grid_h, grid_w, step_h, step_w)  # (N, Hp, Wp, C)
        return out[:, :height, :width]
