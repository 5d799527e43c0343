"""``reference``: the authors' formulation, region layout. The test oracle and the benchmark baseline.

``torch.gather`` over a (N, R, R, L, C) expanded view materialises ``topk`` copies of K/V (slow, memory-hungry,
slower still in backward). The models run it on the whole batch in one call (the authors' data flow).
"""

from __future__ import annotations

import torch

from .registry import REGION_LAYOUT, register_backend


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d) as a view."""
    batch, length, channels = x.shape
    return x.view(batch, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor, batch: int, regions: int) -> torch.Tensor:
    """(N * R, heads, L, d) -> (N, R, L, heads * d)."""
    _, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, regions, length, heads * head_dim)


@register_backend("reference", layout=REGION_LAYOUT, whole_batch=True)
def reference_attention(
    query: torch.Tensor, key_value: torch.Tensor, topk_index: torch.Tensor, *, num_heads: int, scale: float
) -> torch.Tensor:
    """The reference formulation: gather from an expanded (N, R, R, L, C) view (topk-fold copy).

    query (N, R, L_q, C_qk), key_value (N, R, L_kv, C_qk + C_v) -> (N, R, L_q, C_v).
    """
    batch, regions, kv_len, channels = key_value.shape
    q_len, qk_dim, topk = query.shape[2], query.shape[3], topk_index.shape[-1]
    expanded = key_value.unsqueeze(1).expand(-1, regions, -1, -1, -1)  # (N, R, R, L_kv, C), no copy
    index = topk_index.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, kv_len, channels)
    selected = torch.gather(expanded, dim=2, index=index)  # (N, R, topk, L_kv, C)
    selected = selected.reshape(batch * regions, topk * kv_len, channels)
    key = _split_heads(selected[..., :qk_dim], num_heads)  # (N*R, heads, topk*L_kv, d_qk)
    value = _split_heads(selected[..., qk_dim:], num_heads)  # (N*R, heads, topk*L_kv, d_v)
    q = _split_heads(query.reshape(batch * regions, q_len, qk_dim), num_heads)  # (N*R, heads, L_q, d_qk)
    weights = torch.softmax((q * scale) @ key.transpose(-2, -1), dim=-1)
    return _merge_heads(weights @ value, batch, regions)
