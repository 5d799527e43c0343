"""Region layout helpers: images (N, H, W, C) <-> regions (N, R, h*w, C).

Regions are numbered row-major over the region grid (``region = grid_row * grid_w + grid_col``) and the
tokens inside a region are row-major too. This matches the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import is_tracing

# Working set of one chunk of images in the two-pass head-major layout copies (bytes; CPU, eager mode).
LAYOUT_CHUNK_BYTES = 2 * 2**20
# Longest contiguous run (region_w * head_dim elements) of the one-copy layout change that takes the two passes.
TWO_PASS_MAX_RUN = 128


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


def image_to_head_regions_two_pass(
    x: torch.Tensor, grid_h: int, grid_w: int, num_heads: int, parts: int = 1
) -> torch.Tensor:
    """:func:`image_to_head_regions` in two passes over cache-sized groups of images where that is faster
    (:func:`two_pass_layout`), else with its one copy. Same arguments and result."""
    batch, height, width, channels = x.shape
    head_dim = channels // (parts * num_heads)
    if not two_pass_layout(x, width // grid_w, head_dim):
        return image_to_head_regions(x, grid_h, grid_w, num_heads, parts)
    shape = (parts, num_heads, batch, grid_h * grid_w, (height // grid_h) * (width // grid_w), head_dim)
    return _image_to_head_regions_in_chunks(x, grid_h, grid_w, parts * num_heads).view(shape)


def two_pass_layout(x: torch.Tensor, region_w: int, head_dim: int) -> bool:
    """Whether the head-major layout copies of ``x`` run in two passes over chunks of images: in eager mode on
    CPU (traced or compiled graphs keep one copy, which the compiler schedules itself), where the one-copy form
    would move runs of at most ``TWO_PASS_MAX_RUN`` elements (``region_w * head_dim``: stages 2 and 3 of
    biformer_small at 224 px; at stage 1 the one copy is as fast and needs no buffer)."""
    # the size test last: on symbolic sizes (torch.export) it would add a guard
    return (
        x.device.type == "cpu"
        and not is_symbolic(*x.shape, region_w, head_dim)
        and not is_tracing(x)
        and region_w * head_dim <= TWO_PASS_MAX_RUN
    )


def _images_per_chunk(x: torch.Tensor) -> int:
    """How many of ``x``'s (N, H, W, C) images fit in ``LAYOUT_CHUNK_BYTES`` (at least one)."""
    return max(1, LAYOUT_CHUNK_BYTES // (x[0].numel() * x.element_size()))


def _image_to_head_regions_in_chunks(x: torch.Tensor, grid_h: int, grid_w: int, groups: int) -> torch.Tensor:
    """(N, H, W, groups * d) -> contiguous (groups, N, H * W, d), tokens in region order.

    The one-copy form reads ``d`` channels at a time from every token: on CPU a strided walk over the whole
    input for each of the ``groups`` head slices, up to 9x slower than two passes at 224 px (stage 3 of
    biformer_small at batch 8, fp32: 4.5 ms against 0.54 ms; ``benchmarks/RESULTS.md``). Here a group of images
    that fits in ``LAYOUT_CHUNK_BYTES`` is first put in region order with whole tokens (runs of
    ``region_w * channels``), then split by heads (runs of ``d``, rows of the buffer that stays in cache).
    """
    batch, height, width, channels = x.shape
    region_h, region_w, head_dim = height // grid_h, width // grid_w, channels // groups
    step = _images_per_chunk(x)
    out = x.new_empty(groups, batch, height * width, head_dim)
    buffer = x.new_empty(min(step, batch), grid_h, grid_w, region_h, region_w, channels)
    source = x.view(batch, grid_h, region_h, grid_w, region_w, channels).permute(0, 1, 3, 2, 4, 5)
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        regions = buffer[: stop - start]
        regions.copy_(source[start:stop])  # (n, grid_h, grid_w, region_h, region_w, C): region order
        split = regions.view(stop - start, height * width, groups, head_dim).permute(2, 0, 1, 3)
        out[:, start:stop].copy_(split)  # (groups, n, H*W, d)
    return out


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
    with_grad = torch.is_grad_enabled() and (x.requires_grad or (add_to is not None and add_to.requires_grad))
    if with_grad and two_pass_layout(x, region_w, head_dim):
        return HeadRegionsToImage.apply(x, grid_h, grid_w, region_h, region_w, add_to)
    image = _image_order_view(x, grid_h, grid_w, region_h, region_w)  # (N, gh, rh, gw, rw, heads, d)
    if add_to is None:
        return image.reshape(batch, height, width, channels)
    target = add_to.view(image.shape)
    if with_grad:
        return (target + image).reshape(batch, height, width, channels)
    target.add_(image)
    return add_to


def _image_order_view(x: torch.Tensor, grid_h: int, grid_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """(heads, N, R, L, d) seen as (N, grid_h, region_h, grid_w, region_w, heads, d), a view."""
    heads, batch, _, _, head_dim = x.shape
    x = x.view(heads, batch, grid_h, grid_w, region_h, region_w, head_dim)
    return x.permute(1, 2, 4, 3, 5, 0, 6)


class HeadRegionsToImage(torch.autograd.Function):
    """:func:`head_regions_to_image` under autograd (CPU, eager): the same forward; the backward splits the
    image gradient into head-major regions with the two-pass copy (:func:`_image_to_head_regions_in_chunks`)
    instead of autograd's strided copy of a permuted view. Shapes as for :func:`head_regions_to_image`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, grid_h: int, grid_w: int, region_h: int,
        region_w: int, add_to: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.geometry = (x.shape, grid_h, grid_w)
        heads, batch, _, _, head_dim = x.shape
        image = _image_order_view(x, grid_h, grid_w, region_h, region_w)  # one pass: its writes are whole heads
        out = image.contiguous() if add_to is None else add_to.view(image.shape) + image
        return out.view(batch, grid_h * region_h, grid_w * region_w, heads * head_dim)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None, torch.Tensor | None]:
        shape, grid_h, grid_w = ctx.geometry
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _image_to_head_regions_in_chunks(grad.contiguous(), grid_h, grid_w, shape[0]).view(shape)
        grad_add_to = grad if ctx.needs_input_grad[5] else None  # False when add_to is None
        return grad_x, None, None, None, None, grad_add_to


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
