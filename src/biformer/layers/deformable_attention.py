"""Deformable attention (DAT: Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022), with
BRA's projections."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from .._checks import check_positive_int
from .projected_attention import ProjectedAttention, attend_in_groups


def reference_points(points_h: int, points_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Centres of a uniform ``points_h`` x ``points_w`` lattice over the map, in ``grid_sample`` coordinates.

    Coordinates follow ``align_corners=False``: -1 and 1 are the outer edges of the map, so with as many points
    as tokens the points are exactly the token centres.

    Returns:
        (points_h, points_w, 2), the last axis (x, y).
    """
    rows = (torch.arange(points_h, device=device, dtype=dtype) + 0.5) / points_h * 2 - 1
    cols = (torch.arange(points_w, device=device, dtype=dtype) + 0.5) / points_w * 2 - 1
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


class DeformableAttention(ProjectedAttention):
    """Every query attends the same small set of keys/values, bilinearly sampled at learned points (DAT).

    A uniform lattice of ``min(points, H)`` x ``min(points, W)`` reference points covers the map. An offset
    network reads the queries (average-pooled to the lattice, then a 3x3 depth-wise conv, LayerNorm, GELU
    and a 1x1 conv to 2 channels) and moves each point by ``tanh(.) * offset_range`` lattice steps; K and V
    are sampled there with ``F.grid_sample`` (bilinear, border padding: sampling the projected K/V equals
    projecting sampled features because the bilinear weights sum to one). Heads are split in
    ``offset_groups`` groups with their own offsets, as DAT. With zero offsets and ``points`` >= H and W the
    points are the token centres and this is :class:`~biformer.layers.GlobalAttention`. DAT's relative
    position bias is left out (no other mixer here has one). Cost per query: at most ``points ** 2`` keys,
    plus the offset network on ``points ** 2`` positions.

    Args:
        dim: channels; num_heads, qk_dim, qk_scale, side_dwconv as in :class:`~biformer.layers.ProjectedAttention`.
        points: sampling points per side (>= 1).
        offset_groups: groups of heads with their own offsets (must divide ``num_heads``).
        offset_range: largest offset, in lattice steps (> 0).

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        points: int = 8,
        offset_groups: int = 1,
        offset_range: float = 2.0,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv)
        self.points = check_positive_int(points, name="points")
        self.offset_groups = check_positive_int(offset_groups, name="offset_groups")
        if num_heads % offset_groups:
            raise ValueError(
                f"offset_groups: expected a divisor of num_heads ({num_heads}), got {offset_groups}"
            )
        if isinstance(offset_range, bool) or not isinstance(offset_range, (int, float)) or not offset_range > 0:
            raise ValueError(f"offset_range: expected a positive number of lattice steps, got {offset_range!r}")
        self.offset_range = float(offset_range)
        group_channels = self.qk_dim // offset_groups
        self.offset_net = nn.Sequential(
            nn.Conv2d(group_channels, group_channels, kernel_size=3, padding=1, groups=group_channels),
            LayerNorm2d(group_channels),
            nn.GELU(),
            nn.Conv2d(group_channels, 2, kernel_size=1, bias=False),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, points={self.points}, offset_groups={self.offset_groups}, "
            f"offset_range={self.offset_range}"
        )

    def sampling_grid(self, query: torch.Tensor) -> torch.Tensor:
        """Where K/V are sampled: query (N, H, W, qk_dim) -> (N * offset_groups, points_h, points_w, 2) (x, y)."""
        batch, height, width, _ = query.shape
        groups = self.offset_groups
        points_h, points_w = min(self.points, height), min(self.points, width)
        query_image = query.permute(0, 3, 1, 2).reshape(batch * groups, self.qk_dim // groups, height, width)
        pooled = F.adaptive_avg_pool2d(query_image, (points_h, points_w))  # (N*G, qk_dim/G, Ph, Pw)
        offsets = self.offset_net(pooled).permute(0, 2, 3, 1)  # (N*G, Ph, Pw, 2), (x, y)
        step = torch.tensor([2 / points_w, 2 / points_h], device=query.device, dtype=query.dtype)
        reference = reference_points(points_h, points_w, query.device, query.dtype)  # (Ph, Pw, 2)
        return reference + offsets.tanh() * self.offset_range * step

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = qkv.shape
        groups = self.offset_groups
        query, key, value = self.split_qkv(qkv)
        grid = self.sampling_grid(query)  # (N*G, Ph, Pw, 2)
        samples = grid.shape[1] * grid.shape[2]

        def sample(x: torch.Tensor) -> torch.Tensor:  # (N, H, W, c) -> (N, 1, Ph*Pw, c), group g's channels g-th
            image = x.permute(0, 3, 1, 2).reshape(batch * groups, x.shape[-1] // groups, height, width)
            sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
            sampled = sampled.reshape(batch, x.shape[-1], samples)  # (N, c, Ph*Pw), groups in channel order
            return sampled.transpose(1, 2).unsqueeze(1)

        out = attend_in_groups(
            query.reshape(batch, 1, height * width, self.qk_dim), sample(key), sample(value),
            num_heads=self.num_heads, scale=self.scale,
        )  # (N, 1, H*W, C)
        return out.reshape(batch, height, width, self.dim)
