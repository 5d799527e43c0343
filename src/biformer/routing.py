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


def chosen_backends(model: nn.Module, images: torch.Tensor) -> dict[str, str]:
    """The attention backend every NHWC BRA module of ``model`` runs on ``images``, in the current mode.

    Runs ``model(images)`` once and reports, per module (e.g. ``"stages.0.0.attn"``), the backend its forward
    resolves: its own ``backend``, or what ``auto`` picks for that stage's map size, device, dtype and gradient
    mode. Call it the way the model will run: under ``torch.no_grad()`` for inference, with gradients for
    training, inside ``torch.autocast`` for mixed precision.

    Example::

        with torch.no_grad():
            biformer.chosen_backends(model, torch.randn(1, 3, 224, 224))  # {"stages.0.0.attn": "gather", ...}

    Args:
        model: a model (or layer) holding :class:`~biformer.layers.BiLevelRoutingAttention` modules.
        images: its input, e.g. (N, 3, H, W) images.

    Returns:
        module name -> backend name, in module order.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no NHWC BRA module (nothing to report).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not any(isinstance(module, BiLevelRoutingAttention) for module in model.modules()):
        raise ValueError(f"model: expected a model holding BiLevelRoutingAttention (NHWC) modules, got a "
                         f"{type(model).__name__} without any")
    chosen: dict[str, str] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: chosen.__setitem__(name, m.backend_for(args[0])))
        for name, module in model.named_modules()
        if isinstance(module, BiLevelRoutingAttention)
    ]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return chosen

