"""Input validation shared by the layers: clear ``ValueError`` messages instead of deep index errors."""

from __future__ import annotations

import torch
import torch.fx


def is_tracing(x: object = None) -> bool:
    """Whether the model is being traced or compiled rather than run: input checks are skipped then.

    True for a ``torch.fx`` symbolic trace (``x`` is a ``Proxy``), ``torch.jit.trace``, ``torch.compile`` /
    ``torch.export`` (and the ONNX exporters built on them) and the legacy ONNX exporter. The traced graph then
    holds no check; the eager call keeps its clear error.
    """
    if isinstance(x, torch.fx.Proxy):
        return True
    if torch.jit.is_scripting():
        return False
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5; torch.export also compiles
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or (is_exporting is not None and is_exporting())
        or torch.onnx.is_in_onnx_export()
    )


def is_exporting(x: object = None) -> bool:
    """Whether a graph that may hold only PyTorch's own operators is being made: ``torch.jit.trace``,
    ``torch.export`` (and the ONNX exporters), a ``torch.fx`` symbolic trace (``x`` is a ``Proxy``). Unlike
    :func:`is_tracing`, False under ``torch.compile``, whose graphs may call this library's compiled operators."""
    if isinstance(x, torch.fx.Proxy):
        return True
    if torch.jit.is_scripting():
        return False
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return torch.jit.is_tracing() or (exporting is not None and exporting()) or torch.onnx.is_in_onnx_export()


def check_feature_map(x: object, *, name: str, layout: str, channels: int) -> None:
    """Check that ``x`` is a floating-point 4-D map with ``channels`` channels in ``layout``.

    Args:
        x: the tensor to check.
        name: what the caller calls it, used in the message (e.g. ``"BiLevelRoutingAttention input"``).
        layout: ``"NHWC"`` or ``"NCHW"``.
        channels: the channel count the layer was built for.

    Skipped while tracing or compiling (:func:`is_tracing`).
    """
    if is_tracing(x):
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor in {layout} layout, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected a 4-D tensor in {layout} layout, got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    channel_axis = 3 if layout == "NHWC" else 1
    if x.shape[channel_axis] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels on axis {channel_axis} ({layout}), "
            f"got {x.shape[channel_axis]} (shape {tuple(x.shape)})"
        )
    height, width = (x.shape[1], x.shape[2]) if layout == "NHWC" else (x.shape[2], x.shape[3])
    if x.shape[0] == 0 or height <= 0 or width <= 0:
        raise ValueError(f"{name}: expected non-empty batch and spatial sizes, got shape {tuple(x.shape)}")


def check_positive_int(value: object, *, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` >= ``minimum``, else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_head_split(dim: int, qk_dim: int | None, num_heads: int) -> None:
    """Both ``dim`` (values) and ``qk_dim`` (queries, keys) must split evenly into ``num_heads`` heads.

    ``qk_dim`` None: layers whose q, k and v all have ``dim`` channels (only ``dim`` is named in the message).
    """
    if qk_dim is None:
        if dim % num_heads:
            raise ValueError(f"num_heads: dim ({dim}) must be divisible by num_heads, got num_heads={num_heads}")
    elif dim % num_heads or qk_dim % num_heads:
        raise ValueError(
            f"num_heads: dim ({dim}) and qk_dim ({qk_dim}) must be divisible by num_heads, got num_heads={num_heads}"
        )


def check_topk_fits(topk: int, n_win: int, *, blame: str = "topk") -> None:
    """The rule of Bi-Level Routing Attention: ``topk`` routed regions must exist among ``n_win ** 2``.

    Args:
        topk: routed regions per query region.
        n_win: regions per side.
        blame: the argument the message names: ``"topk"`` (a layer built with too large a top-k) or
            ``"n_win"`` (too few regions set afterwards for layers whose top-k is fixed).
    """
    regions = n_win**2
    if topk <= regions:
        return
    if blame == "n_win":
        raise ValueError(f"n_win: {n_win} gives {regions} regions, fewer than topk={topk}")
    raise ValueError(f"topk: expected at most n_win ** 2 = {regions} regions, got {topk}")


def check_unsupported(name: str, value: object, supported: object) -> None:
    """Raise ``NotImplementedError`` for a reference option value no released model uses."""
    if value != supported:
        raise NotImplementedError(
            f"{name}={value!r} is not implemented (no released BiFormer uses it); supported: {supported!r}"
        )
