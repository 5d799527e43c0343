"""Recording the routing decisions of every BRA module in a model (for tests and visualisation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW

ROUTED_LAYERS = (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW)


class _Sink:
    """Where one layer's routing goes: this recorder's dict under ``name``, and the enclosing recorder's sink
    (a nested :func:`record_routing`, possibly of a parent model under another name)."""

    def __init__(self, records: dict[str, torch.Tensor], name: str, outer: tuple | None) -> None:
        self.records, self.name, self.outer = records, name, outer

    def __setitem__(self, _name: str, index: torch.Tensor) -> None:
        self.records[self.name] = index
        if self.outer is not None:
            outer_records, outer_name = self.outer
            outer_records[outer_name] = index

    def __iter__(self) -> Iterator:  # the layers unpack a sink as ``records, name``
        return iter((self, self.name))


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the routed region indices of every BRA module of ``model`` during the block.

    Yields a dict filled as the model runs: module name (e.g. ``"stages.0.0.attn"``) -> int64
    (N, num_regions, topk) indices of that module's last call.

    Recorders may be nested (for the same model or a sub-module): each records while its block runs.

    Example::

        with biformer.record_routing(model) as routing:
            model(images)
        routing["stages.0.0.attn"]  # (N, 49, 1)
    """
    records: dict[str, torch.Tensor] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ROUTED_LAYERS)]
    previous = [layer.routing_sink for _, layer in layers]
    for (name, layer), outer in zip(layers, previous):
        layer.routing_sink = _Sink(records, name, outer)  # nested recorders: the outer one keeps recording
    try:
        yield records
    finally:
        for (_, layer), outer in zip(layers, previous):
            layer.routing_sink = outer
