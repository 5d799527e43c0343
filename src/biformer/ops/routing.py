"""Region-level routing: which regions each query region attends to."""

from __future__ import annotations

import torch


def route_regions(query_regions: torch.Tensor, key_regions: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """Pick, for every query region, the ``topk`` key regions of highest affinity.

    The routing decision is not differentiable: inputs are detached, as in the reference.

    Args:
        query_regions: (N, R, C) region-level queries (mean of q over each region's tokens).
        key_regions: (N, R, C) region-level keys.
        topk: regions kept per query region (<= R).
        scale: multiplier of the affinity logits (does not change the ranking when positive).

    Returns:
        int64 (N, R, topk) key-region indices, sorted by descending affinity.
    """
    logits = (query_regions.detach() * scale) @ key_regions.detach().transpose(-2, -1)  # (N, R, R)
    return torch.topk(logits, k=topk, dim=-1).indices


def routing_mask(topk_index: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Boolean region adjacency (N, R, num_regions): ``mask[n, r, s]`` is True where region r routes to s."""
    batch, regions, _ = topk_index.shape
    mask = torch.zeros(batch, regions, num_regions, dtype=torch.bool, device=topk_index.device)
    return mask.scatter_(2, topk_index, True)
