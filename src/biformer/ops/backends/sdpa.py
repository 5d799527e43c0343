"""``sdpa``: the ``gather`` copy of the routed K/V, then ``scaled_dot_product_attention`` on 4-D tensors.

Head-major. Different q and v head sizes run the explicit ``gather`` form (SDPA's fused kernels need them equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import gathered_keys_values
from .gather import gather_attention
from .registry import register_backend


@register_backend("sdpa", auto=True)
def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """index_select gather + ``scaled_dot_product_attention`` on 4-D tensors. Head-major in and out."""
    if query.shape[-1] != value.shape[-1]:
        # SDPA's fused kernels need equal q and v head sizes; the explicit form computes the same.
        return gather_attention(query, key, value, topk_index, scale=scale)
    heads, batch, regions, q_len, _ = query.shape
    key, value = gathered_keys_values(key, value, topk_index)
    out = F.scaled_dot_product_attention(
        query.flatten(0, 1), key.unflatten(0, (heads * batch, regions)), value.unflatten(0, (heads * batch, regions)),
        scale=scale,
    )  # 4-D (heads * N, R, L_q, d): 5-D inputs take a slow path
    return out.view(heads, batch, regions, q_len, -1)
