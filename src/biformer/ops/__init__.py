"""Functional building blocks of Bi-Level Routing Attention.

:mod:`~biformer.ops.functional` holds the routed-attention functions, :mod:`~biformer.ops.backends` one module
per backend and the registry that chooses among them.
"""

from .backends import attention_backend, available_backends, get_default_backend, select_backend
from .backends.flex import routing_block_mask
from .functional import routed_attention, routed_attention_heads
from .gather import gather_regions, gather_routed
from .regions import (
    head_region_means,
    head_regions_to_image,
    image_to_head_regions,
    image_to_regions,
    pad_bottom_right,
    regions_to_image,
)
from .routing import route_regions, routing_mask

__all__ = [
    "attention_backend",
    "available_backends",
    "gather_regions",
    "gather_routed",
    "get_default_backend",
    "head_region_means",
    "head_regions_to_image",
    "image_to_head_regions",
    "image_to_regions",
    "pad_bottom_right",
    "regions_to_image",
    "route_regions",
    "routed_attention",
    "routed_attention_heads",
    "routing_block_mask",
    "routing_mask",
    "select_backend",
]
