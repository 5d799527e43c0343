"""Functional building blocks of Bi-Level Routing Attention."""

from .attention import (
    attention_backend,
    available_backends,
    gather_routed,
    get_default_backend,
    routed_attention,
    routing_mask,
)
from .regions import image_to_regions, pad_bottom_right, regions_to_image
from .routing import route_regions

__all__ = [
    "attention_backend",
    "available_backends",
    "gather_routed",
    "get_default_backend",
    "image_to_regions",
    "pad_bottom_right",
    "regions_to_image",
    "route_regions",
    "routed_attention",
    "routing_mask",
]
