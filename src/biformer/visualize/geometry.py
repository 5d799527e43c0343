"""Region grids of BRA layers, and the proportional mapping between image pixels and feature-map tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from ..layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW

__all__ = ["RegionGrid", "box_of_span", "region_grid", "token_at"]


@dataclass(frozen=True)
class RegionGrid:
    """How one BRA call cut its feature map into regions.

    ``map_h`` x ``map_w``: the layer's input map in tokens, before padding. ``grid_h`` x ``grid_w``: regions of
    the padded map, numbered row-major (``region = grid_row * grid_w + grid_col``), each ``region_h`` x
    ``region_w`` tokens. ``grid_h * region_h - map_h`` rows (and columns likewise) are bottom/right padding.
    """

    map_h: int
    map_w: int
    grid_h: int
    grid_w: int
    region_h: int
    region_w: int

    @property
    def num_regions(self) -> int:
        return self.grid_h * self.grid_w

    def region_of(self, row: int, col: int) -> int:
        """The region holding token (row, col)."""
        return (row // self.region_h) * self.grid_w + col // self.region_w

    def token_span(self, region: int) -> tuple[int, int, int, int]:
        """``(row_start, row_stop, col_start, col_stop)`` of the region's tokens inside the unpadded map (stops
        exclusive); the span is empty (start == stop) when the region lies entirely in the padding."""
        if not 0 <= region < self.num_regions:
            raise ValueError(f"region: expected 0 <= region < {self.num_regions}, got {region}")
        grid_row, grid_col = divmod(region, self.grid_w)
        row_start = min(grid_row * self.region_h, self.map_h)
        col_start = min(grid_col * self.region_w, self.map_w)
        row_stop = min(row_start + self.region_h, self.map_h)
        col_stop = min(col_start + self.region_w, self.map_w)
        return row_start, row_stop, col_start, col_stop


def region_grid(layer: nn.Module, map_h: int, map_w: int) -> RegionGrid:
    """The region grid ``layer`` uses on a ``map_h`` x ``map_w`` input map (as its ``forward`` lays it out).

    ``BiLevelRoutingAttention``: ``n_win`` x ``n_win`` regions of ``ceil(map / n_win)`` tokens (the map padded
    with ``auto_pad``), or regions of ``region_size`` tokens when that is set. ``BiLevelRoutingAttentionNCHW``:
    regions of ``max(map // n_win, 1)`` tokens, ``ceil(map / region)`` per side.
    """
    if isinstance(layer, BiLevelRoutingAttention):
        if layer.region_size is not None:
            region_h = region_w = layer.region_size
        else:
            region_h, region_w = math.ceil(map_h / layer.n_win), math.ceil(map_w / layer.n_win)
            return RegionGrid(map_h, map_w, layer.n_win, layer.n_win, region_h, region_w)
    elif isinstance(layer, BiLevelRoutingAttentionNCHW):
        region_h, region_w = max(map_h // layer.n_win, 1), max(map_w // layer.n_win, 1)
    else:
        raise TypeError(f"layer: expected a BRA layer, got {type(layer).__name__}")
    return RegionGrid(map_h, map_w, math.ceil(map_h / region_h), math.ceil(map_w / region_w), region_h, region_w)


def token_at(point: tuple[float, float], image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) token of a ``map_h`` x ``map_w`` feature map that covers pixel ``point`` = (x, y) of an
    image of ``image_size`` = (width, height), mapping the image onto the map proportionally."""
    (x, y), (width, height), (map_h, map_w) = point, image_size, map_size
    return min(int(y * map_h / height), map_h - 1), min(int(x * map_w / width), map_w - 1)


def box_of_span(
    span: tuple[int, int, int, int], image_size: tuple[int, int], map_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The pixel box ``(x0, y0, x1, y1)`` that a token span ``(row_start, row_stop, col_start, col_stop)`` of a
    ``map_h`` x ``map_w`` map covers in an image of ``image_size`` = (width, height) (inverse of
    :func:`token_at`)."""
    (row_start, row_stop, col_start, col_stop), (width, height), (map_h, map_w) = span, image_size, map_size
    return col_start * width / map_w, row_start * height / map_h, col_stop * width / map_w, row_stop * height / map_h
