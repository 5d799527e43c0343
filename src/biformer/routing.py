"""Recording the routing decisions of every BRA module in a model (for tests and visualisation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW

ROUTED_LAYERS = (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the routed region indices of every BRA module of ``model`` during the block.

    Yields a dict filled as the model runs: module name (e.g. ``"stages.0.0.attn"``) -> int64
    (N, num_regions, topk) indices of that module's last call.

    Example::

        with biformer.record_routing(model) as routing:
            model(images)
        routing["stages.0.0.attn"]  # (N, 49, 1)
    """
    records: dict[str, torch.Tensor] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ROUTED_LAYERS)]
    for name, layer in layers:
        layer.routing_sink = (records, name)
    try:
        yield records
    finally:
        for _, layer in layers:
            layer.routing_sink = None
