"""Gathering the routed regions' tokens: one copy, no expanded tensor, a deterministic backward.

The reference gathers K/V with ``torch.gather`` over a (N, R, R, L, C) expanded view; the forward is a
topk-fold copy and the backward a scatter over the expanded tensor. Here the regions of all images are
one flattened axis of N * R rows and each routed region is one ``index_select`` row, so the forward is
a plain row copy and the backward a row-wise sum.

Determinism of the backward: on CPU ``index_select``'s backward (``index_add_``) adds the rows one index
after the other, so it is deterministic. On other devices it uses atomic adds, whose order varies from
run to run; there the gather runs as :class:`SortedRowGather`, whose backward sorts the indices and
sums each region's rows with ``torch.segment_reduce`` (no floating-point atomics).
"""

from __future__ import annotations

import torch


def offset_region_index(topk_index: torch.Tensor) -> torch.Tensor:
    """Routed regions as rows of the flattened (N * R) region axis.

    Args:
        topk_index: int64 (N, R, topk), region indices per image.

    Returns:
        int64 (N * R * topk,): ``topk_index[n, r, t] + n * R``, in (n, r, t) order.
    """
    batch, regions, _ = topk_index.shape
    offsets = torch.arange(batch, device=topk_index.device).view(batch, 1, 1) * regions
    return (topk_index + offsets).reshape(-1)


class SortedRowGather(torch.autograd.Function):
    """``source.index_select(1, index)`` whose backward is a sorted segment sum instead of atomic adds.

    Shapes: source (A, M, B), index int64 (K,) with values in [0, M) -> (A, K, B).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = source.shape[1]
        return source.index_select(1, index)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        order = torch.argsort(index, stable=True)  # the rows of each source row become adjacent
        counts = torch.bincount(index, minlength=ctx.rows)  # (M,): integer counts, exact
        grad_sorted = grad.index_select(1, order)  # (A, K, B)
        lengths = counts.expand(grad.shape[0], ctx.rows).contiguous()  # segment_reduce wants (A, M)
        grad_source = torch.segment_reduce(grad_sorted, "sum", lengths=lengths, axis=1, unsafe=True)
        return grad_source, None  # (A, M, B)


def gather_rows(source: torch.Tensor, index: torch.Tensor, deterministic_backward: bool | None = None) -> torch.Tensor:
    """``source.index_select(1, index)`` with a deterministic backward on every device.

    Args:
        source: (A, M, B).
        index: int64 (K,).
        deterministic_backward: force (True) or skip (False) :class:`SortedRowGather`; None picks it on
            every device but CPU, where ``index_select``'s own backward is already deterministic.

    Returns:
        (A, K, B).
    """
    if deterministic_backward is None:
        deterministic_backward = source.device.type != "cpu"
    if deterministic_backward and torch.is_grad_enabled() and source.requires_grad:
        return SortedRowGather.apply(source, index)
    return source.index_select(1, index)


def gather_regions(x: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """The tokens of each query region's routed regions, head-major.

    Args:
        x: (heads, N, R, L, d) keys or values.
        topk_index: int64 (N, R, topk).

    Returns:
        (heads, N, R, topk * L, d): for query region r of image n, the tokens of regions
        ``topk_index[n, r]`` in routing order.
    """
    heads, batch, regions, length, head_dim = x.shape
    topk = topk_index.shape[-1]
    rows = x.reshape(heads, batch * regions, length * head_dim)  # a view for contiguous x
    gathered = gather_rows(rows, offset_region_index(topk_index))  # (heads, N * R * topk, L * d)
    return gathered.view(heads, batch, regions, topk * length, head_dim)


def gather_routed(key_value: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """Gather the tokens of each query region's routed regions without an expanded copy (region layout).

    Args:
        key_value: (N, R, L_kv, C) (may be a channel slice of a larger tensor).
        topk_index: int64 (N, R, topk).

    Returns:
        (N * R, topk * L_kv, C): for query region ``n * R + r`` the tokens of its routed regions, in
        routing order.
    """
    batch, regions, kv_len, channels = key_value.shape
    topk = topk_index.shape[-1]
    flat = key_value.reshape(batch * regions, kv_len, channels)
    gathered = flat.index_select(0, offset_region_index(topk_index))  # (N * R * topk, L_kv, C)
    return gathered.view(batch * regions, topk * kv_len, channels)
