"""``triton``: fused gather + attention for routed (BRA) attention in Triton, forward and backward.

The other backends copy the routed keys and values before attention (``gather``, ``sdpa``: ``topk`` times
the size of K/V) or compute every score (``dense``). The kernels here read the routed regions' keys and
values by index straight from the head-major K/V, so nothing is gathered:

- forward: one program per (head and image, query region, tile of up to 64 queries); it walks the
  ``topk * L_kv`` routed keys in tiles of up to 64 positions (a tile may span several small regions) with
  an online softmax, writes the output (heads, N, R, L_q, d_v) and the log-sum-exp of every query row;
- backward, without atomics: dQ per query region as in the forward; dK and dV per key region, summed
  over the query regions that routed to it, found through the transposed routing (a CSR list built with
  a stable ``torch.sort`` and ``torch.searchsorted``, as FlexAttention's BlockMask keeps its transposed blocks).
  Every output tile has exactly one writer and sums in a fixed order: the backward is deterministic.

Supported: float32 (IEEE products, or TF32 where ``torch.backends.cuda.matmul.allow_tf32`` is set),
bfloat16 and float16 (float32 accumulation); any region size, any ``topk``, q and v head sizes up to
``MAX_HEAD_DIM`` (tiles are padded to powers of two >= 16 and masked). Where the kernel cannot run the
backend computes the same function with its ``fallback`` (``gather``): tensors on a CPU without
``TRITON_INTERPRET=1`` (the kernels need a GPU; with the variable set they run in Triton's CPU
interpreter, slowly: that is how they are tested), devices other than CUDA and CPU, and other dtypes
(float64). The kernels run outside ``torch.compile`` graphs (one graph break).

``triton`` is imported only when this backend runs; without it the backend raises a one-line error.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from types import SimpleNamespace

import torch

from .gather import gather_attention
from .registry import register_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_BLOCK = 64  # largest query / key tile (head sizes up to 64; halved for 128 and again for 256)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16 on GPUs


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _require_triton() -> None:
    if not triton_available():
        raise ImportError("backend='triton' needs the 'triton' package, which is not installed: pip install triton")


def triton_can_run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`triton_routed_attention` runs the Triton kernels (rather than its fallback) here.

    Raises ImportError when ``triton`` is missing and ValueError for head sizes above ``MAX_HEAD_DIM``.
    """
    _require_triton()
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(
                f"{name}: the triton backend supports head sizes up to {MAX_HEAD_DIM}, got {tensor.shape[-1]}"
            )
    device = query.device.type
    on_device = device == "cuda" or (device == "cpu" and interpreter_requested())
    same_dtype = query.dtype == key.dtype == value.dtype
    return on_device and same_dtype and query.dtype in SUPPORTED_DTYPES


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The three kernels, compiled for the GPU (``triton.jit``) or wrapped for the CPU interpreter."""
    import triton

    from . import _triton_kernels as source

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = triton.jit
    return SimpleNamespace(
        forward=wrap(source.routed_attention_forward),
        backward_query=wrap(source.routed_attention_backward_query),
        backward_key_value=wrap(source.routed_attention_backward_key_value),
    )


def _block(length: int, head_block: int) -> int:
    """A power-of-two tile of at least ``MIN_BLOCK`` covering ``length``, at most ``MAX_BLOCK`` for head
    tiles up to 64 and smaller for wider heads, so that the backward's shared memory stays about 100 KiB
    in float32 (compiled for sm_90: 66 KiB at head size 32 with 64 x 64 tiles, 214 KiB at head size 128
    with 64 x 64 tiles, 103 KiB with 32 x 32)."""
    largest = max(MIN_BLOCK, MAX_BLOCK * 64 // max(64, head_block))
    return max(MIN_BLOCK, min(largest, 1 << max(0, length - 1).bit_length()))


def _head_block(dim: int) -> int:
    return max(MIN_BLOCK, 1 << max(0, dim - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # fp32 with TF32 allowed; ignored for half-precision operands


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # (B, R, L, d)


def transposed_routing(topk_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every key region, the query regions that routed to it (CSR form, deterministic order).

    Args:
        topk_index: int64 (N, R, topk).

    Returns:
        offsets int64 (N * R + 1,) and sources int64 (N * R * topk,): the query regions (indices in
        [0, R), within the image) that routed to region ``s`` of image ``n`` are
        ``sources[offsets[n * R + s] : offsets[n * R + s + 1]]``, in ascending (query region, slot) order;
        a query region appears once per slot that routes to ``s``.
    """
    batch, regions, topk = topk_index.shape
    image = torch.arange(batch, device=topk_index.device).view(batch, 1, 1)
    targets = (topk_index + image * regions).reshape(-1)  # key region row of every (n, r, t) entry
    sorted_targets, order = torch.sort(targets, stable=True)
    # offsets[g] = entries routed to regions before g (searchsorted: no atomics, deterministic on every device)
    rows = torch.arange(batch * regions + 1, device=topk_index.device)
    offsets = torch.searchsorted(sorted_targets, rows)
    sources = torch.div(order, topk, rounding_mode="floor") % regions
    return offsets, sources


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(heads, N, R, L, d) -> (heads * N, R, L, d), a view where the strides allow it."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, scale: float,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, L_q, d_qk), (B, R, L_kv, d_qk), (B, R, L_kv, d_v) -> out (B, R, L_q, d_v), lse fp32 (B, R, L_q)."""
    rows, regions, q_len, d_qk = query.shape
    kv_len, d_v = key.shape[2], value.shape[-1]
    batch, _, topk = topk_index.shape
    out = query.new_empty(rows, regions, q_len, d_v)
    lse = torch.empty(rows, regions, q_len, dtype=torch.float32, device=query.device)
    head_block = max(_head_block(d_qk), _head_block(d_v))
    block_q = _block(q_len, head_block)
    grid = (rows, regions, -(-q_len // block_q))
    _kernels(interpret).forward[grid](
        query, key, value, topk_index, out, lse,
        *_strides(query), *_strides(key), *_strides(value), *_strides(out),
        batch, regions, q_len, kv_len, topk, d_qk, d_v, float(scale),
        BLOCK_Q=block_q, BLOCK_K=_block(topk * kv_len, head_block), BLOCK_DQK=_head_block(d_qk),
        BLOCK_DV=_head_block(d_v), PRECISION=_precision(query.dtype), UPCAST=interpret and query.dtype != torch.float32,
    )
    return out, lse


def _backward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, grad_out: torch.Tensor, scale: float, interpret: bool, need_query: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """dQ (or None), dK, dV in the shapes of query, key, value (B, R, L, d), contiguous."""
    rows, regions, q_len, d_qk = query.shape
    kv_len, d_v = key.shape[2], value.shape[-1]
    batch, _, topk = topk_index.shape
    kernels = _kernels(interpret)
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, R, L_q): rowsum(dO * O)
    blocks = dict(
        BLOCK_DQK=_head_block(d_qk), BLOCK_DV=_head_block(d_v), PRECISION=_precision(query.dtype),
        UPCAST=interpret and query.dtype != torch.float32,
    )
    common = (*_strides(query), *_strides(key), *_strides(value), *_strides(grad_out))
    grad_query = None
    head_block = max(_head_block(d_qk), _head_block(d_v))
    block_q = _block(q_len, head_block)
    if need_query:
        grad_query = torch.empty(rows, regions, q_len, d_qk, dtype=query.dtype, device=query.device)
        kernels.backward_query[(rows, regions, -(-q_len // block_q))](
            query, key, value, topk_index, grad_out, lse, delta, grad_query, *common,
            batch, regions, q_len, kv_len, topk, d_qk, d_v, float(scale),
            BLOCK_Q=block_q, BLOCK_K=_block(topk * kv_len, head_block), **blocks,
        )
    offsets, sources = transposed_routing(topk_index)
    grad_key = torch.empty(rows, regions, kv_len, d_qk, dtype=key.dtype, device=key.device)
    grad_value = torch.empty(rows, regions, kv_len, d_v, dtype=value.dtype, device=value.device)
    block_kv = _block(kv_len, head_block)
    kernels.backward_key_value[(rows, regions, -(-kv_len // block_kv))](
        query, key, value, grad_out, lse, delta, offsets, sources, grad_key, grad_value, *common,
        batch, regions, q_len, kv_len, d_qk, d_v, float(scale),
        BLOCK_Q=block_q, BLOCK_KV=block_kv, **blocks,
    )
    return grad_query, grad_key, grad_value


class FusedRoutedAttention(torch.autograd.Function):
    """Autograd wrapper of the kernels. Tensors (B = heads * N, R, L, d); topk_index int64 (N, R, topk)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        topk_index: torch.Tensor, scale: float, interpret: bool,
    ) -> torch.Tensor:
        out, lse = _forward(query, key, value, topk_index, scale, interpret)
        ctx.save_for_backward(query, key, value, topk_index, out, lse)
        ctx.scale, ctx.interpret = scale, interpret
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        query, key, value, topk_index, out, lse = ctx.saved_tensors
        grad_query, grad_key, grad_value = _backward(
            query, key, value, topk_index, out, lse, grad_out, ctx.scale, ctx.interpret,
            need_query=ctx.needs_input_grad[0],
        )
        return grad_query, grad_key, grad_value, None, None, None


@torch.compiler.disable
def triton_routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    scale: float,
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Routed attention with the fused Triton kernels where they can run, else with ``fallback``.

    Args:
        query: (heads, N, R, L_q, d_qk); key: (heads, N, R, L_kv, d_qk); value: (heads, N, R, L_kv, d_v).
        topk_index: int64 (N, R, topk), values in [0, R).
        scale: multiplier of q before the dot product.
        fallback: a head-major backend with the same signature (used where :func:`triton_can_run` is False).

    Returns:
        (heads, N, R, L_q, d_v), in the dtype of query.
    """
    if not triton_can_run(query, key, value):
        return fallback(query, key, value, topk_index, scale=scale)
    heads, batch = query.shape[:2]
    interpret = query.device.type == "cpu"
    out = FusedRoutedAttention.apply(
        _as_rows(query), _as_rows(key), _as_rows(value), topk_index.contiguous(), float(scale), interpret
    )
    return out.view(heads, batch, *out.shape[1:])


@register_backend("triton", devices=("cuda",), dtypes=SUPPORTED_DTYPES, max_head_dim=MAX_HEAD_DIM)
def triton_attention_backend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Fused gather + attention Triton kernels; ``gather`` where they cannot run (see above)."""
    return triton_routed_attention(query, key, value, topk_index, scale=scale, fallback=gather_attention)
