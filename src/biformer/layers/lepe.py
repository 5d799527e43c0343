"""The depth-wise conv that adds local context to attention (LCE in BRA, LePE in plain attention)."""

from __future__ import annotations

import torch.nn as nn

from .depthwise import DepthwiseConv2d


def make_lepe(dim: int, kernel_size: int) -> nn.Conv2d | None:
    """Depth-wise ``kernel_size`` x ``kernel_size`` conv with bias that keeps the map size, (N, dim, H, W) ->
    (N, dim, H, W); ``None`` when ``kernel_size`` is 0 (off).

    Raises:
        ValueError: ``kernel_size`` negative, even or not an integer (named ``side_dwconv``, the option that
            sets it).
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 0:
        raise ValueError(f"side_dwconv: expected 0 (off) or a positive odd integer, got {kernel_size!r}")
    if kernel_size == 0:
        return None
    if kernel_size % 2 == 0:
        raise ValueError(f"side_dwconv: expected an odd kernel size (the map size must not change), got {kernel_size}")
    return DepthwiseConv2d(dim, kernel_size)
