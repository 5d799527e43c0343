"""Region layout helpers: images (N, H, W, C) <-> regions (N, R, h*w, C).

Regions are numbered row-major over the region grid (``region = grid_row * grid_w + grid_col``) and the
tokens inside a region are row-major too. This matches the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_symbolic(*sizes: int) -> bool:
    """Whether sizes may be symbolic (under ``torch.compile`` / ``torch.export``, or any of ``sizes`` is a
    ``torch.SymInt``): code then takes its branch-free path (the same numbers) instead of branching on them."""
    return torch.compiler.is_compiling() or any(isinstance(size, torch.SymInt) for size in sizes)


def pad_bottom_right(x: torch.Tensor, multiple_h: int, multiple_w: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad an NHWC map at the bottom/right so H and W become multiples.

    Args:
        x: (N, H, W, C).
        multiple_h: the multiple to reach for H.
        multiple_w: the multiple to reach for W.

    Returns:
        the padded map (N, H + pad_h, W + pad_w, C), pad_h, pad_w.
    """
    height, width = x.shape[1], x.shape[2]
    # ceil(H / m) * m - H (the same as (m - H % m) % m): written so that, with a symbolic H (torch.export,
    # torch.compile(dynamic=True)), the padded size is visibly ``m * ceil(H / m)`` and nothing guards on H.
    pad_h = (height + multiple_h - 1) // multiple_h * multiple_h - height
    pad_w = (width + multiple_w - 1) // multiple_w * multiple_w - width
    if is_symbolic(pad_h, pad_w) or pad_h or pad_w:
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


def image_to_head_regions(x: torch.Tensor, grid_h: int, grid_w: int, num_heads: int, parts: int = 1) -> torch.Tensor:
    """Split an NHWC map into regions, head-major, with one copy.

    The channels are ``parts`` chunks (e.g. k and v) of ``num_heads`` heads of ``d`` channels each.

    Args:
        x: (N, H, W, parts * num_heads * d) with H divisible by ``grid_h`` and W by ``grid_w``; a channel
            slice of a larger tensor is fine.

    Returns:
        contiguous (parts, num_heads, N, grid_h * grid_w, region_h * region_w, d).
    """
    batch, height, width, channels = x.shape
    regions, tokens = grid_h * grid_w, (height // grid_h) * (width // grid_w)
    view = head_regions_view(x, grid_h, grid_w, num_heads, parts)
    return view.reshape(parts, num_heads, batch, regions, tokens, channels // (parts * num_heads))


def head_regions_view(x: torch.Tensor, grid_h: int, grid_w: int, num_heads: int, parts: int = 1) -> torch.Tensor:
    """The layout :func:`image_to_head_regions` copies into, as a view of ``x`` (no copy; writing to it writes
    ``x``).

    Args:
        x: (N, H, W, parts * num_heads * d), as for :func:`image_to_head_regions`.

    Returns:
        a (parts, num_heads, N, grid_h, grid_w, region_h, region_w, d) view.
    """
    batch, height, width, channels = x.shape
    region_h, region_w, head_dim = height // grid_h, width // grid_w, channels // (parts * num_heads)
    x = x.view(batch, grid_h, region_h, grid_w, region_w, parts, num_heads, head_dim)
    return x.permute(5, 6, 0, 1, 3, 2, 4, 7)  # (parts, heads, N, grid_h, grid_w, region_h, region_w, d)


def head_regions_to_image(
    x: torch.Tensor, grid_h: int, grid_w: int, region_h: int, region_w: int, add_to: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`image_to_head_regions` (one part), optionally added to a map in the same pass.

    Args:
        x: (heads, N, grid_h * grid_w, region_h * region_w, d).
        add_to: None, or a contiguous (N, H, W, heads * d) map to add the result to. Outside autograd it
            is updated in place (it must be a temporary the caller owns).

    Returns:
        (N, H, W, heads * d) with H = grid_h * region_h and W = grid_w * region_w.
    """
    heads, batch, _, _, head_dim = x.shape
    height, width, channels = grid_h * region_h, grid_w * region_w, heads * head_dim
    x = x.view(heads, batch, grid_h, grid_w, region_h, region_w, head_dim)
    x = x.permute(1, 2, 4, 3, 5, 0, 6)  # (N, grid_h, region_h, grid_w, region_w, heads, d), a view
    if add_to is None:
        return x.reshape(batch, height, width, channels)
    target = add_to.view(batch, grid_h, region_h, grid_w, region_w, heads, head_dim)
    if torch.is_grad_enabled() and (x.requires_grad or add_to.requires_grad):
        return (target + x).reshape(batch, height, width, channels)
    target.add_(x)
    return add_to


def head_region_means(x: torch.Tensor) -> torch.Tensor:
    """Mean token of every region, channels in the usual (heads * d) order.

    Args:
        x: (heads, N, R, L, d).

    Returns:
        (N, R, heads * d).
    """
    heads, batch, regions, _, head_dim = x.shape
    return x.mean(dim=3).permute(1, 2, 0, 3).reshape(batch, regions, heads * head_dim)


def regions_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Region layout to head-major layout: (N, R, L, heads * d) -> contiguous (heads, N, R, L, d)."""
    batch, regions, length, channels = x.shape
    x = x.reshape(batch, regions, length, num_heads, channels // num_heads)
    return x.permute(3, 0, 1, 2, 4).contiguous()  # (heads, N, R, L, d)


def heads_to_regions(x: torch.Tensor) -> torch.Tensor:
    """Head-major layout to region layout: (heads, N, R, L, d) -> (N, R, L, heads * d)."""
    heads, batch, regions, length, head_dim = x.shape
    return x.permute(1, 2, 3, 0, 4).reshape(batch, regions, length, heads * head_dim)
