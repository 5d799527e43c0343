"""``cpu_fused``: routed attention as fused C++ kernels on the CPU (:mod:`biformer.ops.cpu_kernels`). Head-major,
and an entry that reads the BRA projection's output directly.

Nothing is gathered or copied into a head-major layout: per image, query region and head the kernel reads the
routed keys and values where they lie, computes the scores, softmax and weighted sum in float32 registers, and
writes the output in image order with the local-context map added. Its backward recomputes the scores from the
saved log-sum-exp (no score tensor kept) and is deterministic. float32 and bfloat16 (float32 arithmetic).

Where the kernels cannot run (another device or dtype, kernels switched off or not buildable on this machine,
export / tracing, symbolic image sizes) the backend computes the same function with ``gather``. Under
``torch.compile`` the kernels are operators of the graph (their shapes are known at compile time).
"""

from __future__ import annotations

import torch

from ..._checks import is_exporting
from ..cpu_kernels import SUPPORTED_DTYPES, FusedHeadAttention, image_attention, kernels_ready
from ..depthwise import plain_depthwise_parts
from .gather import gather_attention
from .registry import register_backend


def kernels_usable() -> bool:
    """Whether ``auto`` may pick the kernels now: not while exporting or tracing a graph that must hold only
    PyTorch's operators (``torch.compile`` may: the operators have compile-time shapes), and built (the first call
    may build them, see :mod:`biformer.ops.cpu_kernels`)."""
    return not is_exporting() and kernels_ready()


def kernels_run(*tensors: torch.Tensor) -> bool:
    """Whether the kernels (rather than the fallback) compute a call on these tensors: CPU, one float32 or bfloat16
    dtype, not exported or traced, static sizes but the batch (a symbolic image size under ``torch.compile``
    keeps the PyTorch backends), kernels built."""
    first = tensors[0]
    return (
        not is_exporting(first)
        and first.device.type == "cpu"
        and first.dtype in SUPPORTED_DTYPES
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and not any(isinstance(size, torch.SymInt) for size in first.shape[1:])
        and kernels_ready()
    )


def fused_image_attention(
    qkv: torch.Tensor, topk_index: torch.Tensor, add_to: torch.Tensor | None, *, grid_h: int, grid_w: int,
    num_heads: int, qk_dim: int, scale: float, local_conv: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The BRA layer's entry, where :func:`kernels_run` said yes for qkv: qkv (N, H, W, 2 * qk_dim + C) -> the
    attention output in image order (N, H, W, C), plus ``add_to`` (N, H, W, C, qkv's dtype) when given, or plus
    ``local_conv`` (a plain depth-wise conv of 3, 5 or 7, see :func:`~biformer.ops.depthwise.plain_depthwise_parts`)
    applied to the value channels by the fused kernels, forward and backward."""
    if local_conv is None:
        return image_attention(qkv, topk_index, add_to, grid_h, grid_w, num_heads, qk_dim, scale)
    weight, bias = plain_depthwise_parts(local_conv)
    return image_attention(qkv, topk_index, None, grid_h, grid_w, num_heads, qk_dim, scale, weight, bias)


def local_conv_fuses(conv: torch.nn.Module | None) -> bool:
    """Whether :func:`fused_image_attention` can take ``conv`` as its ``local_conv``: a plain depth-wise conv of
    3, 5 or 7 (the sizes of the kernels' backward)."""
    parts = None if conv is None else plain_depthwise_parts(conv)
    return parts is not None and parts[0].shape[-1] in (3, 5, 7)


@register_backend(
    "cpu_fused", auto=True, devices=("cpu",), dtypes=SUPPORTED_DTYPES, available=kernels_usable,
    image_function=fused_image_attention, runs_on=kernels_run, fuses_local_conv=local_conv_fuses,
)
def cpu_fused_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Fused gather + attention on head-major tensors (heads, N, R, L, d) -> (heads, N, R, L_q, d_v); ``gather``
    where the kernels cannot run (see module doc)."""
    if not kernels_run(query, key, value):
        return gather_attention(query, key, value, topk_index, scale=scale)
    return FusedHeadAttention.apply(query, key, value, topk_index, scale)
