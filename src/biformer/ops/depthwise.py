"""Depth-wise convolution (stride 1, 'same' padding) with a faster backward on the CPU.

BiFormer runs a depth-wise conv twice per block (the 3x3 position encoding and the 5x5 local-context conv).
Their forward in channels-last memory is fast on the CPU, their backward (oneDNN's) is not: at biformer_small's
stage shapes (batch 8) the 5x5 weight gradient took 4-6x the time of the formulation below, and the input
gradient about 3x that of a forward conv. :func:`depthwise_conv2d` computes the same gradients as:

- input: the forward depth-wise conv of the output gradient with the kernel flipped (stride 1, the same padding);
- weight: for each image ``n`` and channel ``c``, the cross-correlation of the padded input map with the
  output-gradient map, i.e. one forward depth-wise conv with ``N * C`` groups whose "kernel" is the output
  gradient, summed over the images;
- bias: the sum of the output gradient over images and positions.

It is used for kernels of 5 and more (the 5x5 local-context conv); the 3x3 position encoding keeps oneDNN's
backward, which is as fast or faster there (``FAST_BACKWARD_MIN_KERNEL``).

The gradients equal the plain conv's to float rounding (a different summation order). It runs in CPU training
in eager mode, in float32 and in bfloat16 (bfloat16 tensors, or float32 ones under CPU bfloat16 autocast: cast as
autocast casts them, the conv then in bfloat16 as autocast runs it; oneDNN's bfloat16 depth-wise backward was
the slowest of all). Elsewhere (no gradients, other devices or dtypes, ``torch.compile``, export, tracing) it is
the plain ``F.conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import is_tracing

# The smallest kernel that takes this backward. Measured (benchmarks/bench_vs_swin.py, depth-wise conv table, one
# thread, batch 8, biformer_small's stage shapes): 5x5 1.05-2.2x faster in float32 and 4.4-6x in bfloat16 than
# oneDNN's backward; 3x3 0.80-0.99x in float32 (oneDNN's own is good there), so 3x3 keeps the plain conv.
FAST_BACKWARD_MIN_KERNEL = 5
_DTYPES = (torch.float32, torch.bfloat16)


def _weight_grad_grouped(x: torch.Tensor, grad: torch.Tensor, kernel: int, padding: int) -> torch.Tensor:
    """(N, C, H, W) input and output gradient -> (C, 1, k, k) weight gradient, as one grouped forward conv."""
    batch, channels, height, width = x.shape
    maps = x.contiguous().view(1, batch * channels, height, width)
    kernels = grad.contiguous().view(batch * channels, 1, height, width)
    per_image = F.conv2d(maps, kernels, padding=padding, groups=batch * channels)  # (1, N * C, k, k)
    summed = per_image.view(batch, channels, kernel, kernel).sum(0, dtype=torch.float32)  # one rounding in bf16
    return summed.to(x.dtype).unsqueeze(1)


class DepthwiseConv2dFunction(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` with the backward described in the module doc."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        channels, kernel = weight.shape[0], weight.shape[-1]
        padding = kernel // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=padding, groups=channels)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad_grouped(x, grad, kernel, padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
        return grad_x, grad_w, grad_b


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the conv computes in (bfloat16 under CPU autocast), or None where the plain conv runs."""
    if is_tracing(x) or x.device.type != "cpu" or x.dim() != 4:
        return None
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    kernel_h, kernel_w = weight.shape[-2:]
    if kernel_h != kernel_w or kernel_w % 2 == 0 or kernel_w < FAST_BACKWARD_MIN_KERNEL:
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 else None
    return x.dtype if x.dtype in _DTYPES and weight.dtype == x.dtype else None


def uses_fast_backward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`depthwise_conv2d` takes :class:`DepthwiseConv2dFunction` for these tensors."""
    return _compute_dtype(x, weight) is not None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depth-wise conv, stride 1, padding ``k // 2`` (odd square kernels).

    Args:
        x: (N, C, H, W) (channels-last memory is the fast layout on CPU).
        weight: (C, 1, k, k), k odd.
        bias: (C,) or None.

    Returns:
        (N, C, H, W).
    """
    dtype = _compute_dtype(x, weight)
    if dtype is not None:
        if torch.is_autocast_enabled("cpu"):  # autocast's casts (tracked by autograd), then the conv in bfloat16
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                return DepthwiseConv2dFunction.apply(x, weight, bias)
        return DepthwiseConv2dFunction.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
