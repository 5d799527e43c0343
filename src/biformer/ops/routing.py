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


def route_projection(qkv: torch.Tensor, grid_h: int, grid_w: int, qk_dim: int, topk: int, scale: float) -> torch.Tensor:
    """:func:`route_regions` on the region means of the BRA projection's q and k channels.

    One pass of the fused CPU kernel where it runs (means and affinities in float32; see
    :func:`biformer.ops.cpu_kernels.route_image`), else the means over a region view and :func:`route_regions`.

    Args:
        qkv: (N, H, W, 2 * qk_dim + C), H and W multiples of the grid.
        grid_h: regions per column.
        grid_w: regions per row.
        qk_dim: channels of q (and of k).
        topk: regions kept per query region.
        scale: multiplier of the affinity logits.

    Returns:
        int64 (N, grid_h * grid_w, topk).
    """
    from .backends.cpu_fused import kernels_run
    from .cpu_kernels import route_image
    from .regions import image_to_regions

    if kernels_run(qkv):
        return route_image(qkv, grid_h, grid_w, qk_dim, topk, scale)
    means = image_to_regions(qkv[..., : 2 * qk_dim].detach(), grid_h, grid_w).mean(dim=2)  # (N, R, 2 * qk_dim)
    return route_regions(means[..., :qk_dim], means[..., qk_dim:], topk, scale)
