"""The BRA projection's output split into head-major q, k, v regions (and V in image order for the LCE conv),
with a training backward that writes the projection's gradient once.

The forward is :func:`~biformer.ops.regions.image_to_head_regions` (one copy per part), or under autograd its
two-pass form where that is faster (:func:`~biformer.ops.regions.two_pass_layout`). Under autograd the plain
form cost three extra passes over the (N, H, W, 2 * qk_dim + C) gradient in backward: unpacking q, k, v from one
tensor stacks their gradients (``torch.stack``), and the LCE conv's input, a channel slice of the projection, gets
its gradient as a zero-filled full-size tensor with the slice copied in, which autograd then adds to the other.
:class:`QKVToHeads` writes the three gradients straight into one uninitialised tensor and adds the LCE's into its
V channels (biformer_small's stage-1 block, forward + backward at batch 8, see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import torch

from .._checks import is_tracing
from .regions import head_regions_view, image_to_head_regions, image_to_head_regions_two_pass


class QKVToHeads(torch.autograd.Function):
    """qkv (N, H, W, 2 * qk_dim + C) -> q, k (heads, N, R, L, qk_dim / heads), v (heads, N, R, L, C / heads),
    each contiguous, and V as a contiguous (N, H, W, C) map (or None when ``with_image_value`` is False)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, qkv: torch.Tensor, grid_h: int, grid_w: int, num_heads: int,
        qk_dim: int, with_image_value: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ctx.geometry = (qkv.shape, grid_h, grid_w, num_heads, qk_dim)
        query, key, value = _split(qkv, grid_h, grid_w, num_heads, qk_dim, two_pass=True)
        image_value = qkv[..., 2 * qk_dim :].contiguous() if with_image_value else None
        return query, key, value, image_value

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_query: torch.Tensor | None, grad_key: torch.Tensor | None,
        grad_value: torch.Tensor | None, grad_image_value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        shape, grid_h, grid_w, num_heads, qk_dim = ctx.geometry
        like = next(g for g in (grad_query, grad_key, grad_value, grad_image_value) if g is not None)
        grad = like.new_empty(shape)  # every element is written below
        parts = ((grad_query, slice(0, qk_dim)), (grad_key, slice(qk_dim, 2 * qk_dim)),
                 (grad_value, slice(2 * qk_dim, shape[-1])))
        for part_grad, channels in parts:
            target = head_regions_view(grad[..., channels], grid_h, grid_w, num_heads)[0]
            if part_grad is None:
                target.zero_()
            else:
                target.copy_(part_grad.view(target.shape))  # one pass: this direction's writes are whole heads
        if grad_image_value is not None:
            grad[..., 2 * qk_dim :].add_(grad_image_value)
        return grad, None, None, None, None, None


def qkv_to_heads(
    qkv: torch.Tensor, grid_h: int, grid_w: int, num_heads: int, qk_dim: int, with_image_value: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split the BRA projection into head-major regions, and V in image order for the LCE conv.

    Args:
        qkv: (N, H, W, 2 * qk_dim + C), H divisible by ``grid_h`` and W by ``grid_w``.
        grid_h: regions per column.
        grid_w: regions per row.
        num_heads: heads (qk_dim and C divisible by it).
        qk_dim: channels of q and of k.
        with_image_value: whether to return V as an image (for the LCE conv).

    Returns:
        q, k (heads, N, R, L, qk_dim / heads), v (heads, N, R, L, C / heads), contiguous; and V as (N, H, W, C)
        or None. Without a gradient V is a view of ``qkv`` (no copy); with one, a contiguous copy made by
        :class:`QKVToHeads`, whose backward writes the gradient of ``qkv`` once.
    """
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    if needs_grad and not is_tracing(qkv):
        return QKVToHeads.apply(qkv, grid_h, grid_w, num_heads, qk_dim, with_image_value)
    query, key, value = _split(qkv, grid_h, grid_w, num_heads, qk_dim, two_pass=False)
    return query, key, value, (qkv[..., 2 * qk_dim :] if with_image_value else None)


def _split(
    qkv: torch.Tensor, grid_h: int, grid_w: int, num_heads: int, qk_dim: int, two_pass: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v head-major: one copy when the three have one width, else one for q and k and one for v.

    ``two_pass``: copy with :func:`~biformer.ops.regions.image_to_head_regions_two_pass` (the training path, whose
    whole batch is one call; without gradients the models already run the blocks on cache-sized groups of images).
    """
    to_heads = image_to_head_regions_two_pass if two_pass else image_to_head_regions
    if qkv.shape[-1] == 3 * qk_dim:
        query, key, value = to_heads(qkv, grid_h, grid_w, num_heads, parts=3)
        return query, key, value
    query, key = to_heads(qkv[..., : 2 * qk_dim], grid_h, grid_w, num_heads, parts=2)
    return query, key, to_heads(qkv[..., 2 * qk_dim :], grid_h, grid_w, num_heads)[0]
