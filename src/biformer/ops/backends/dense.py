"""``dense``: attention over every token of the image, the unrouted regions masked out; no gather. Head-major.

The mask is a 0/-inf bias added to the scores (inside SDPA where it is faster, else to the explicit products).

Wins when few regions are skipped (stage 3 at 224 px: 16 of 49 routed); its cost grows with the square of the
token count, so ``auto`` gives it only small maps (``DENSE_MAX_TOKENS``) with a large routed fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention_form import explicit_attention_is_faster
from ._common import scaled_scores
from .registry import register_backend

# Largest token count per image for which ``auto`` considers ``dense`` (its scores grow with the square).
DENSE_MAX_TOKENS = 1024
# ``auto`` takes ``dense`` when at least this fraction of the regions is routed (its wasted work is the rest).
DENSE_MIN_ROUTED_FRACTION = 0.25


@register_backend(
    "dense", auto=True, max_tokens=DENSE_MAX_TOKENS, min_routed_fraction=DENSE_MIN_ROUTED_FRACTION
)
def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Attention over all tokens, unrouted regions masked: no gather, O((R * L)^2) scores. Head-major.

    ``scaled_dot_product_attention`` with the routing as an additive 0/-inf mask (:func:`routing_bias`, broadcast
    over the heads); the explicit products where SDPA is slower (a bf16 backward on CPU, see
    :func:`~biformer.ops.attention_form.explicit_attention_is_faster`) or cannot run its fused kernels (q and v
    head sizes differ). The same function either way.
    """
    heads, batch, regions, q_len, qk_head = query.shape
    kv_len = key.shape[3]
    bias = routing_bias(topk_index, regions, q_len, kv_len, query.dtype)  # (N, R*L_q, R*L_kv)
    if qk_head != value.shape[-1] or explicit_attention_is_faster(query, key, value):
        return _explicit_dense(query, key, value, bias, scale)
    out = F.scaled_dot_product_attention(
        query.flatten(2, 3).transpose(0, 1), key.flatten(2, 3).transpose(0, 1), value.flatten(2, 3).transpose(0, 1),
        attn_mask=bias.unsqueeze(1), scale=scale,
    )  # (N, heads, R*L_q, d_v): the head-major tensors seen batch-first, no copy
    return out.transpose(0, 1).unflatten(2, (regions, q_len))  # (heads, N, R, L_q, d_v), a view


def _explicit_dense(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias) @ v with batched products: (heads, N, R, L, d) x3, bias (N, R*L_q, R*L_kv)
    -> (heads, N, R, L_q, d_v)."""
    heads, batch, regions, q_len, _ = query.shape
    scores = scaled_scores(query.flatten(0, 1).flatten(1, 2), key.flatten(0, 1).flatten(1, 2), scale)
    # (heads * N, R*L_q, R*L_kv) seen as (heads, N, R*L_q, R*L_kv) plus the bias broadcast over the heads only:
    # its inner dimension is a whole row of keys, so the add runs vectorised (a boolean fill through a
    # (heads, N, R, L_q, R, L_kv) view ran rows of L_kv elements: 6x slower at stage 3). The add is not recorded
    # by autograd: the softmax already gives the masked scores (exp(-inf) = 0) a zero gradient and passes the
    # others through unchanged, which is all the add's backward would do, and nothing saved the unbiased scores.
    with torch.no_grad():
        scores.view(heads, batch, *scores.shape[1:]).add_(bias)
    out = torch.bmm(torch.softmax(scores, dim=-1), value.flatten(0, 1).flatten(1, 2))  # (heads*N, R*L_q, d_v)
    return out.view(heads, batch, regions, q_len, -1)


def routing_bias(topk_index: torch.Tensor, regions: int, q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query token's region routes to the key token's region, -inf elsewhere.

    Args:
        topk_index: int64 (N, R, topk) routed region indices.
        regions: R.
        q_len: L_q, query tokens per region.
        kv_len: L_kv, key tokens per region.
        dtype: the dtype of the scores it is added to.

    Returns:
        contiguous (N, R * L_q, R * L_kv), tokens region-major (the head-major layout's order).
    """
    batch = topk_index.shape[0]
    bias = torch.full((batch, regions, 1, regions, 1), float("-inf"), dtype=dtype, device=topk_index.device)
    bias.view(batch, regions, regions).scatter_(2, topk_index, 0.0)
    return bias.expand(batch, regions, q_len, regions, kv_len).reshape(batch, regions * q_len, regions * kv_len)
