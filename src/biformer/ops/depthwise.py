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

from .._checks import is_exporting, is_tracing

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


# --- inference on the fused CPU kernels --------------------------------------------------------------------------
def plain_depthwise_parts(conv: object) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of ``conv`` when it is a plain depth-wise conv the fused CPU kernels compute exactly
    (``nn.Conv2d``, or a class declaring ``computes_plain_conv = True`` in its own body such as
    :class:`~biformer.layers.depthwise.DepthwiseConv2d`; groups = channels, an odd square kernel,
    stride 1, padding ``k // 2``, no dilation, zero padding, no hooks, float32 parameters), else None."""
    import torch.nn as nn

    from .linear import runs_as_written

    # nn.Conv2d itself, or a class that declares (in its own body, not inherited) that its forward is that conv
    plain_class = type(conv) is nn.Conv2d or type(conv).__dict__.get("computes_plain_conv", False)
    if not plain_class or not runs_as_written(conv):
        return None
    kernel = conv.kernel_size[0]
    plain = (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.kernel_size == (kernel, kernel) and kernel % 2 == 1
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (kernel // 2, kernel // 2)
        and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32
    )
    return (conv.weight, conv.bias) if plain else None


def _runs_kernel(nhwc: torch.Tensor, conv: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias of ``conv`` where the fused depth-wise kernel computes it on the map (N, H, W, C) now:
    CPU, float32 or bfloat16, channels contiguous, kernels built, not traced; in training only float32 kernels of
    5 and 7. Else None."""
    from .backends.cpu_fused import kernels_run

    if is_exporting(nhwc):
        return None
    parts = plain_depthwise_parts(conv)
    if parts is None or nhwc.dim() != 4 or nhwc.stride(3) != 1 or not kernels_run(nhwc):
        return None
    weight, bias = parts
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (nhwc, weight, bias))
    if not needs_grad:
        return parts
    # training: float32 kernels of 5 and 7, where its forward + backward was measured faster than the other convs
    # (benchmarks/bench_vs_swin.py, depth-wise table); 3x3 and bfloat16 keep PyTorch's conv and its backward
    trains_faster = weight.shape[-1] in (5, 7) and nhwc.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return parts if trains_faster else None


class FusedDepthwiseConv(torch.autograd.Function):
    """conv(x) + bias (+ x with ``residual``) on an NHWC map with the fused CPU kernels, forward and backward:
    the input gradient is the same kernel with the flipped weight (plus the gradient itself for the residual), the
    weight and bias gradients one pass over the input and the output gradient (float32 sums). Shapes: x
    (N, H, W, C) -> contiguous (N, H, W, C); weight (C, 1, k, k), bias (C,) or None."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        residual: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.residual, ctx.has_bias = residual, bias is not None
        return torch.ops.biformer_cpu.depthwise_conv(x, weight, bias, residual, None)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.biformer_cpu.depthwise_conv(grad, weight.flip(-2, -1), None, ctx.residual, None)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = torch.ops.biformer_cpu.depthwise_conv_weight_grad(x, grad.to(x.dtype), weight.shape[-1])
            grad_w = grad_w.to(weight.dtype)
            grad_b = grad_b.to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def depthwise_nhwc(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """``conv`` on an NHWC map: the fused CPU kernel where it runs (float32 arithmetic, the result in x's dtype;
    forward and backward), else ``conv`` on the NCHW view.

    Args:
        x: (N, H, W, C) (a channel slice of a larger map is fine).
        conv: a depth-wise conv keeping the map size.

    Returns:
        contiguous (N, H, W, C).
    """
    parts = _runs_kernel(x, conv)
    if parts is not None:
        return _fused(x, *parts, residual=False)
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()  # a view when the conv keeps NHWC


def add_depthwise(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """``x + conv(x)`` (the models' position encoding), in one pass of the fused CPU kernel where it runs
    (float32 arithmetic; the sum keeps x's dtype, as ``x + conv(x)`` does under autocast; forward and backward),
    else as written.

    Args:
        x: (N, C, H, W), channels-last memory on the fast path.
        conv: a depth-wise conv keeping the map size.

    Returns:
        (N, C, H, W), channels-last memory on the fast path.
    """
    parts = None if is_exporting(x) or x.dim() != 4 else _runs_kernel(x.permute(0, 2, 3, 1), conv)
    if parts is None:
        return x + conv(x)
    return _fused(x.permute(0, 2, 3, 1), *parts, residual=True).permute(0, 3, 1, 2)


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: bool) -> torch.Tensor:
    """The fused kernel on x (N, H, W, C): through autograd where a backward may run, else one call."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return FusedDepthwiseConv.apply(x, weight, bias, residual)
    return torch.ops.biformer_cpu.depthwise_conv(x, weight, bias, residual, None)
