"""Region layout helpers: images (N, H, W, C) <-> regions (N, R, h*w, C).

Regions are numbered row-major over the region grid (``region = grid_row * grid_w + grid_col``) and the
tokens inside a region are row-major too. This matches the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_bottom_right(x: torch.Tensor, multiple_h: int, multiple_w: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad an NHWC map at the bottom/right so H and W become multiples.

    Args:
        x: (N, H, W, C).
        multiple_h, multiple_w: the multiples to reach.

    Returns:
        the padded map (N, H + pad_h, W + pad_w, C), pad_h, pad_w.
    """
    height, width = x.shape[1], x.shape[2]
    pad_h = (multiple_h - height % multiple_h) % multiple_h
    pad_w = (multiple_w - width % multiple_w) % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, pad_h, pad_w


def image_to_regions(x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Split an NHWC map into a grid of regions.

    Args:
        x: (N, H, W, C) with H divisible by ``grid_h`` and W by ``grid_w``.

    Returns:
        (N, grid_h * grid_w, region_h * region_w, C).
    """
    batch, height, width, channels = x.shape
    region_h, region_w = height // grid_h, width // grid_w
    x = x.view(batch, grid_h, region_h, grid_w, region_w, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, grid_h, grid_w, region_h, region_w, C)
    return x.reshape(batch, grid_h * grid_w, region_h * region_w, channels)


def regions_to_image(x: torch.Tensor, grid_h: int, grid_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """Inverse of :func:`image_to_regions`.

    Args:
        x: (N, grid_h * grid_w, region_h * region_w, C).

    Returns:
        (N, grid_h * region_h, grid_w * region_w, C).
    """
    batch, channels = x.shape[0], x.shape[-1]
    x = x.view(batch, grid_h, grid_w, region_h, region_w, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, grid_h, region_h, grid_w, region_w, C)
    return x.reshape(batch, grid_h * region_h, grid_w * region_w, channels)
