"""Routing pictures: where each Bi-Level Routing Attention layer sends a query token, and its attention.

``explain_routing`` computes the data (regions, routed regions by rank, attention heat maps),
``plot_routing`` draws it with matplotlib, ``show_routing`` does both.
"""

from .attention import TokenAttention, projected_queries_keys, token_attention
from .geometry import RegionGrid, box_of_span, region_grid, token_at
from .panels import RoutingPanel, capture_routing, default_layers, explain_routing, prepare_image
from .plot import plot_routing, show_routing

__all__ = [
    "RegionGrid",
    "RoutingPanel",
    "TokenAttention",
    "box_of_span",
    "capture_routing",
    "default_layers",
    "explain_routing",
    "plot_routing",
    "prepare_image",
    "projected_queries_keys",
    "region_grid",
    "show_routing",
    "token_at",
    "token_attention",
]
