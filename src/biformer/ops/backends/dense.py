"""``dense``: attention over every token of the image, the unrouted regions masked out; no gather. Head-major.

Wins when few regions are skipped (stage 3 at 224 px: 16 of 49 routed); its cost grows with the square of the
token count, so ``auto`` gives it only small maps (``DENSE_MAX_TOKENS``) with a large routed fraction.
"""

from __future__ import annotations

import torch

from ..routing import routing_mask
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
    """Attention over all tokens, unrouted regions masked: no gather, O((R * L)^2) scores. Head-major."""
    heads, batch, regions, q_len, _ = query.shape
    kv_len = key.shape[3]
    scores = scaled_scores(query.flatten(2, 3).flatten(0, 1), key.flatten(2, 3).flatten(0, 1), scale)
    blocked = ~routing_mask(topk_index, regions)  # (N, R, R)
    # (heads * N, R*L_q, R*L_kv) seen as (heads, N, R, L_q, R, L_kv); the mask broadcasts, nothing expanded.
    # The fill is not recorded by autograd: the softmax already gives the filled scores (exp(-inf) = 0) a zero
    # gradient, which is all the fill's backward would do, and nothing saves the unfilled scores. Recorded, the
    # in-place fill of a view would make autograd copy the whole score tensor three times in backward
    # (CopySlices) and fill it a second time.
    with torch.no_grad():
        scores.view(heads, batch, regions, q_len, regions, kv_len).masked_fill_(
            blocked.view(1, batch, regions, 1, regions, 1), float("-inf")
        )
    out = torch.bmm(torch.softmax(scores, dim=-1), value.flatten(2, 3).flatten(0, 1))  # (heads*N, R*L_q, d_v)
    return out.view(heads, batch, regions, q_len, -1)
