"""Local window attention, plain or shifted (Swin Transformer: Liu et al., ICCV 2021), with BRA's projections."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from ..ops.regions import image_to_regions, pad_bottom_right, regions_to_image
from .projected_attention import ProjectedAttention


def shifted_window_labels(
    height: int, width: int, padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Which shifted window each token of the padded map belongs to, before the cyclic roll.

    Shifting the window grid by ``s`` makes windows start at rows ``s - w, s, s + w, ...``: row ``y`` is in
    window ``(y + w - s) // w`` (same for columns). After the roll by ``-s`` the first and last partial
    windows share one window; their different labels keep them apart (Swin's attention mask).

    Returns:
        int (1, padded_h, padded_w, 1): a window id for real tokens, -1 for the bottom/right padding.
    """
    rows = (torch.arange(padded[0], device=device) + window[0] - shift[0]) // window[0]
    cols = (torch.arange(padded[1], device=device) + window[1] - shift[1]) // window[1]
    labels = rows[:, None] * (padded[1] // window[1] + 2) + cols[None, :]  # (padded_h, padded_w)
    labels[height:, :] = -1
    labels[:, width:] = -1
    return labels[None, :, :, None]


class WindowAttention(ProjectedAttention):
    """Attention inside non-overlapping ``window`` x ``window`` windows, optionally shifted (Swin).

    Windows tile the map from the top-left; the map is zero-padded at the bottom/right to whole windows
    and padded keys are masked, so real tokens see exactly the real tokens of their window. On a side
    shorter than ``window`` the window is that side (one window, no shift): with ``window`` >= H and W
    this is :class:`~biformer.layers.GlobalAttention`. With ``shift`` > 0 the window grid is moved by
    ``shift`` tokens (Swin's cyclic roll plus mask; no token attends across the map border).
    Cost per query: at most ``window ** 2`` keys.

    Args:
        dim: channels; num_heads, qk_dim, qk_scale, side_dwconv as in :class:`~biformer.layers.ProjectedAttention`.
        window: window side in tokens (>= 1).
        shift: displacement of the window grid in tokens, ``0 <= shift < window`` (Swin uses ``window // 2``
            in every second block).

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window: int = 7,
        shift: int = 0,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv)
        self.window = check_positive_int(window, name="window")
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < window:
            raise ValueError(f"shift: expected an integer with 0 <= shift < window ({window}), got {shift!r}")
        self.shift = shift

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, shift={self.shift}"

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        height, width = qkv.shape[1], qkv.shape[2]
        window = (min(self.window, height), min(self.window, width))
        shift = tuple(self.shift if side > self.window else 0 for side in (height, width))  # one window: no shift
        qkv, pad_h, pad_w = pad_bottom_right(qkv, *window)  # (N, Hp, Wp, 2*qk_dim + C)
        padded = (qkv.shape[1], qkv.shape[2])
        grid = (padded[0] // window[0], padded[1] // window[1])
        labels = None
        if pad_h or pad_w or any(shift):
            labels = shifted_window_labels(height, width, padded, window, shift, qkv.device)
            labels = torch.roll(labels, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            labels = image_to_regions(labels, *grid)[0, :, :, 0]  # (windows, window_h * window_w)
        if any(shift):
            qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        out = self.attend_groups(image_to_regions(qkv, *grid), labels)  # (N, windows, window_h * window_w, C)
        out = regions_to_image(out, *grid, *window)  # (N, Hp, Wp, C)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :height, :width]
