"""``flex``: FlexAttention for routed attention, a block mask from the routing, guarded against its known traps.

With region-major token order (each region's tokens contiguous) BRA is block-sparse attention: query
block r (one region, L_q tokens) sees exactly the kv blocks ``topk_index[n, r]`` (L_kv tokens each). The
block mask is built with ``BlockMask.from_kv_blocks``, the routed blocks marked *full* (no per-token
masking inside them).

Traps this module guards (measured with torch 2.14 on CPU):

- Eager ``flex_attention`` ignores the block structure and evaluates ``mask_mod`` on every (q, kv)
  pair: with ``mask_mod=None`` it silently computes dense attention. The mask here always carries a
  ``mask_mod`` that is true exactly on the routed pairs, so even the eager path is correct; but as that
  path is dense (memory grows with the square of the token count), outside ``torch.compile`` the
  backend computes the same function with the ``fallback`` (``gather``) instead.
- FlexAttention has no backward on CPU: with gradients required on CPU the ``fallback`` is used.
- Compiled with symbolic (dynamic) shapes, the CPU kernel fails to build (a C++ compile error in
  torch 2.14): with a symbolic size the ``fallback`` is used, so a model compiled with a dynamic batch
  runs ``gather`` there.
- Different q and v head sizes, or a torch without FlexAttention (< 2.5): the ``fallback``.
- Top-1 routing (stage 1 of BiFormer): the mask built inside the graph makes inductor fail ("no
  choices"), and building it eagerly breaks the graph, after which the resumed frames receive the sizes as
  symbolic integers and inductor's CPU template fails on the model's later layers ("'Mul' object has no
  attribute 'get_name'"): top-1 layers use the ``fallback``, so a whole model compiles as one graph.
- A batch of 1 made ``contiguous`` return a view of the 5-D input whose layout the CPU template unpacks as
  4-D ("too many values to unpack"): the token layout is always a fresh copy.
- Strided q/k/v views also make the CPU lowering fail: they are made contiguous (one copy each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..routing import routing_mask
from .gather import gather_attention
from .registry import register_backend

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: the backend always uses its fallback
    BlockMask = flex_attention = None


def routing_block_mask(topk_index: torch.Tensor, q_len: int, kv_len: int) -> BlockMask:
    """A BlockMask for region-major tokens: query block r sees the kv blocks ``topk_index[:, r]``.

    Args:
        topk_index: int64 (N, R, topk).
        q_len: tokens per query region (the query block size).
        kv_len: tokens per key region (the key block size).

    Returns:
        BlockMask over (N, 1 (broadcast over heads), R * q_len, R * kv_len); its ``mask_mod`` computes
        the same mask token by token.
    """
    batch, regions, topk = topk_index.shape
    allowed = routing_mask(topk_index, regions)  # (N, R, R)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return allowed[b, q_idx // q_len, kv_idx // kv_len]

    int32 = dict(dtype=torch.int32, device=topk_index.device)
    full_counts = torch.full((batch, 1, regions), topk, **int32)  # every routed block is full
    padding = torch.zeros(batch, regions, regions - topk, **int32)
    full_indices = torch.cat([topk_index.to(torch.int32), padding], dim=-1).unsqueeze(1)  # (N, 1, R, R)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(full_counts),  # no partial blocks
        torch.zeros_like(full_indices),
        full_counts,
        full_indices,
        BLOCK_SIZE=(q_len, kv_len),
        mask_mod=mask_mod,
        seq_lengths=(regions * q_len, regions * kv_len),
    )


def _has_symbolic_size(*tensors: torch.Tensor) -> bool:
    return any(isinstance(size, torch.SymInt) for t in tensors for size in t.shape)


def flex_can_run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`flex_routed_attention` would use FlexAttention (rather than its fallback) here."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return (
        flex_attention is not None
        and torch.compiler.is_compiling()
        and not (needs_grad and query.device.type == "cpu")
        and not _has_symbolic_size(query, key, value)
        and query.shape[-1] == value.shape[-1]
    )


def _flex_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor) -> bool:
    return flex_can_run(query, key, value) and topk_index.shape[-1] > 1


def flex_routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    scale: float,
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Routed attention with FlexAttention where that is safe, else with ``fallback`` (same signature).

    Args:
        query: (heads, N, R, L_q, d); key: (heads, N, R, L_kv, d); value: (heads, N, R, L_kv, d).
        topk_index: int64 (N, R, topk).

    Returns:
        (heads, N, R, L_q, d).
    """
    if not _flex_applies(query, key, value, topk_index):
        return fallback(query, key, value, topk_index, scale=scale)
    heads, batch, regions, q_len, _ = query.shape
    mask = routing_block_mask(topk_index, q_len, key.shape[3])

    def tokens(x: torch.Tensor) -> torch.Tensor:
        # (heads, N, R, L, d) -> contiguous (N, heads, R * L, d): with strided inputs the CPU kernel's
        # lowering fails in torch 2.14 ("no choices"), and batch-broadcast masks fail too.
        # A batch of 1 makes the transpose a no-op and ``contiguous`` returns a view of the 5-D input, whose
        # layout the CPU template then unpacks as 4-D ("too many values to unpack"): always a fresh buffer.
        return x.flatten(2, 3).transpose(0, 1).clone(memory_format=torch.contiguous_format)

    out = flex_attention(tokens(query), tokens(key), tokens(value), block_mask=mask, scale=scale)
    return out.transpose(0, 1).unflatten(2, (regions, q_len))  # (heads, N, R, L_q, d)


@register_backend("flex")
def flex_attention_backend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """FlexAttention under ``torch.compile``; ``gather`` where FlexAttention cannot be used (see above)."""
    return flex_routed_attention(query, key, value, topk_index, scale=scale, fallback=gather_attention)
