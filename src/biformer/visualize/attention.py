"""A query token's attention probabilities over its routed keys, recomputed from a BRA layer's input and
parameters (the layers return only their output, not the attention weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW
from ..ops.regions import image_to_regions, pad_bottom_right, regions_to_image
from .geometry import RegionGrid, region_grid

__all__ = ["TokenAttention", "projected_queries_keys", "token_attention"]


@dataclass
class TokenAttention:
    """One query token's attention in one BRA call.

    Attributes:
        grid: the layer's region grid on this input.
        query_region: the region holding the token.
        routed_regions: int64 (topk,) the regions its keys come from, in routing order (rank 1 first).
        probabilities: (heads, topk, region_h * region_w) softmax over all topk * region_h * region_w routed
            keys (tokens of a region row-major; padding tokens included, as the layer attends to them).
        heat: (heads, map_h, map_w) the probabilities placed at their keys' positions in the unpadded map,
            0 at tokens the query does not attend to (keys in the padding are dropped).
    """

    grid: RegionGrid
    query_region: int
    routed_regions: torch.Tensor
    probabilities: torch.Tensor
    heat: torch.Tensor


def _head_count_and_dim(layer: nn.Module) -> tuple[int, int]:
    qk_dim = layer.qk_dim if isinstance(layer, BiLevelRoutingAttention) else layer.dim
    return layer.num_heads, qk_dim


def projected_queries_keys(layer: nn.Module, x: torch.Tensor, grid: RegionGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of every token of the padded map, as ``layer`` computes them.

    Args:
        layer: a ``BiLevelRoutingAttention`` (x NHWC (N, H, W, C), padded before the projection) or a
            ``BiLevelRoutingAttentionNCHW`` (x NCHW (N, C, H, W), q and k zero-padded after it).
        grid: ``region_grid(layer, H, W)``.

    Returns:
        query, key: (N, grid_h * region_h, grid_w * region_w, qk_dim) each.
    """
    padded_h, padded_w = grid.grid_h * grid.region_h, grid.grid_w * grid.region_w
    if isinstance(layer, BiLevelRoutingAttention):
        x, _, _ = pad_bottom_right(x, padded_h, padded_w)  # (N, H', W', C)
        qkv = layer.qkv(x)  # (N, H', W', 2 * qk_dim + C)
        return qkv[..., : layer.qk_dim], qkv[..., layer.qk_dim : 2 * layer.qk_dim]
    if isinstance(layer, BiLevelRoutingAttentionNCHW):
        query, key, _ = layer.qkv_linear(x).chunk(3, dim=1)  # (N, C, H, W) each
        query, _, _ = pad_bottom_right(query.permute(0, 2, 3, 1), padded_h, padded_w)  # (N, H', W', C)
        key, _, _ = pad_bottom_right(key.permute(0, 2, 3, 1), padded_h, padded_w)
        return query, key
    raise TypeError(f"layer: expected a BRA layer, got {type(layer).__name__}")


@torch.no_grad()
def token_attention(
    layer: nn.Module, x: torch.Tensor, topk_index: torch.Tensor, row: int, col: int, batch_index: int = 0
) -> TokenAttention:
    """Attention probabilities of token (row, col) of image ``batch_index`` over its routed keys.

    Args:
        layer: the BRA layer (``BiLevelRoutingAttention`` or ``BiLevelRoutingAttentionNCHW``).
        x: the layer's input, NHWC (N, H, W, C) or NCHW (N, C, H, W) as the layer takes it.
        topk_index: int64 (N, regions, topk), the routing the layer used on ``x`` (``record_routing``).
        row: the query token's row in the unpadded H x W map.
        col: the query token's column.
        batch_index: which image of the batch.
    """
    map_h, map_w = (x.shape[2], x.shape[3]) if isinstance(layer, BiLevelRoutingAttentionNCHW) else x.shape[1:3]
    grid = region_grid(layer, map_h, map_w)
    if topk_index.shape[1] != grid.num_regions:
        raise ValueError(
            f"topk_index: expected {grid.num_regions} query regions for a {map_h}x{map_w} map "
            f"({grid.grid_h}x{grid.grid_w} grid), got shape {tuple(topk_index.shape)}"
        )
    if not (0 <= row < map_h and 0 <= col < map_w):
        raise ValueError(f"row, col: expected a token inside the {map_h}x{map_w} map, got ({row}, {col})")
    num_heads, qk_dim = _head_count_and_dim(layer)
    query, key = projected_queries_keys(layer, x[batch_index : batch_index + 1], grid)
    query_region = grid.region_of(row, col)
    routed = topk_index[batch_index, query_region]  # (topk,)
    topk, region_tokens = routed.numel(), grid.region_h * grid.region_w
    keys = image_to_regions(key, grid.grid_h, grid.grid_w)[0, routed]  # (topk, region_tokens, qk_dim)
    keys = keys.reshape(topk * region_tokens, num_heads, qk_dim // num_heads).transpose(0, 1)  # (heads, keys, d)
    token_query = query[0, row, col].view(num_heads, 1, qk_dim // num_heads)  # (heads, 1, d)
    logits = (token_query * layer.scale) @ keys.transpose(1, 2)  # (heads, 1, topk * region_tokens)
    probabilities = logits.softmax(dim=-1).view(num_heads, topk, region_tokens)
    heat_regions = probabilities.new_zeros(num_heads, grid.num_regions, region_tokens)
    heat_regions[:, routed] = probabilities  # routed regions are distinct (top-k)
    heat = regions_to_image(heat_regions.unsqueeze(-1), grid.grid_h, grid.grid_w, grid.region_h, grid.region_w)
    heat = heat[:, :map_h, :map_w, 0]  # (heads, map_h, map_w)
    return TokenAttention(grid, query_region, routed.clone(), probabilities, heat)
