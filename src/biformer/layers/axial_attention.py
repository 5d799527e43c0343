"""Axial stripe attention (CSWin Transformer's cross-shaped windows: Dong et al., CVPR 2022), with BRA's
projections."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from ..ops.regions import image_to_regions, pad_bottom_right, regions_to_image
from .projected_attention import ProjectedAttention, attend_in_groups, padding_labels


class AxialStripeAttention(ProjectedAttention):
    """Half of the heads attend inside horizontal stripes, the other half inside vertical stripes (CSWin).

    Horizontal stripes are ``stripe_width`` rows by the whole width, vertical stripes the whole height by
    ``stripe_width`` columns, tiled from the top-left; together a query sees a cross through itself. Each
    branch zero-pads its own axis to whole stripes and masks the padded keys. On a side shorter than
    ``stripe_width`` the stripe is that side; when stripes cover the map both branches are global
    attention. Cost per query: at most ``stripe_width * W`` keys (horizontal heads) or
    ``stripe_width * H`` (vertical heads).

    Args:
        dim: channels; num_heads, qk_dim, qk_scale, side_dwconv as in :class:`~biformer.layers.ProjectedAttention`;
            ``num_heads`` must be even (the first half horizontal, the second half vertical).
        stripe_width: stripe width in tokens (>= 1).

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        stripe_width: int = 1,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv)
        if num_heads % 2:
            raise ValueError(
                f"num_heads: axial stripe attention splits the heads between horizontal and vertical stripes, "
                f"expected an even number, got {num_heads}"
            )
        self.stripe_width = check_positive_int(stripe_width, name="stripe_width")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stripe_width={self.stripe_width}"

    def _stripes(self, qkv: torch.Tensor, vertical: bool) -> torch.Tensor:
        """Attention of one half of the heads inside stripes: (N, H, W, qk_dim + C/2) -> (N, H, W, C/2)."""
        height, width = qkv.shape[1], qkv.shape[2]
        if vertical:
            window = (height, min(self.stripe_width, width))
            qkv, pad_h, pad_w = pad_bottom_right(qkv, 1, window[1])
        else:
            window = (min(self.stripe_width, height), width)
            qkv, pad_h, pad_w = pad_bottom_right(qkv, window[0], 1)
        grid = (qkv.shape[1] // window[0], qkv.shape[2] // window[1])
        labels = None
        if pad_h or pad_w:
            labels = padding_labels(height, width, qkv.shape[1], qkv.shape[2], qkv.device)
            labels = image_to_regions(labels, *grid)[0, :, :, 0]  # (stripes, tokens per stripe)
        groups = image_to_regions(qkv, *grid)  # (N, stripes, tokens per stripe, qk_dim + C/2)
        query, key, value = groups.split([self.qk_dim // 2, self.qk_dim // 2, self.dim // 2], dim=-1)
        out = attend_in_groups(query, key, value, num_heads=self.num_heads // 2, scale=self.scale, labels=labels)
        return regions_to_image(out, *grid, *window)[:, :height, :width]  # (N, H, W, C/2)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        query, key, value = self.split_qkv(qkv)
        halves = [part.chunk(2, dim=-1) for part in (query, key, value)]  # heads are contiguous channel chunks
        horizontal = torch.cat([part[0] for part in halves], dim=-1)  # (N, H, W, qk_dim + C/2)
        vertical = torch.cat([part[1] for part in halves], dim=-1)
        return torch.cat([self._stripes(horizontal, vertical=False), self._stripes(vertical, vertical=True)], dim=-1)
