"""Where each BRA layer of a model routes the tokens under given image points: the data behind the picture."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import functional as TF

from ..images import open_image
from ..layers import BiLevelRoutingAttentionNCHW
from ..routing import ROUTED_LAYERS, record_routing
from .attention import token_attention
from .geometry import RegionGrid, box_of_span, token_at

__all__ = ["RoutingPanel", "capture_routing", "default_layers", "explain_routing", "prepare_image"]

Point = tuple[float, float]


@dataclass
class RoutingPanel:
    """One query point seen by one BRA layer.

    Attributes:
        layer: the layer's module name (e.g. ``"stages.0.1.attn"``).
        point: (x, y) in pixels of the original image.
        image_size: (width, height) of the original image.
        token: (row, col) of the query token in the layer's feature map.
        grid: the layer's region grid.
        query_region: the region holding the token.
        routed_regions: the regions the query region attends to, in routing order: ``routed_regions[0]`` has
            rank 1 (highest routing score). Taken from the routing the model recorded while it ran.
        heat: (map_h, map_w) the token's attention probabilities over its routed keys, mean over heads.
    """

    layer: str
    point: Point
    image_size: tuple[int, int]
    token: tuple[int, int]
    grid: RegionGrid
    query_region: int
    routed_regions: list[int]
    heat: torch.Tensor

    def region_box(self, region: int) -> tuple[float, float, float, float] | None:
        """Pixel box ``(x0, y0, x1, y1)`` of ``region`` in the original image, clipped to the image; ``None``
        when the region lies entirely in the layer's padding."""
        row_start, row_stop, col_start, col_stop = span = self.grid.token_span(region)
        if row_start == row_stop or col_start == col_stop:
            return None
        return box_of_span(span, self.image_size, (self.grid.map_h, self.grid.map_w))

    @property
    def padding_ranks(self) -> list[int]:
        """Ranks (1-based) of routed regions that lie entirely in the padding (nothing to draw)."""
        return [rank for rank, region in enumerate(self.routed_regions, 1) if self.region_box(region) is None]


def prepare_image(image: Image.Image, model: nn.Module, image_size: int | None = None) -> torch.Tensor:
    """The model input for ``image``: resized (bicubic) so its shorter side is ``image_size`` pixels, aspect
    kept and nothing cropped, normalised with the model's pretrained mean/std.

    ``image_size`` defaults to the model's pretrained input size (224 for the named variants). Returns
    (1, 3, H, W).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.convert("RGB").resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    tensor = TF.to_tensor(resized)  # (3, H, W) in [0, 1]
    tensor = TF.normalize(tensor, cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
    return tensor.unsqueeze(0)


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """Record, for every BRA layer of ``model`` run inside the block, ``(layer, input, topk_index)`` (the
    yielded dict is filled when the block ends).

    ``input`` is what the layer received (NHWC or NCHW as the layer takes it); ``topk_index`` int64
    (N, regions, topk) the routing it used (from :func:`biformer.record_routing`).
    """
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ROUTED_LAYERS)}
    handles = [
        module.register_forward_pre_hook(lambda _module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, module in layers.items()
    ]
    captured: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
    try:
        with record_routing(model) as routing:
            yield captured
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        if name in routing:
            captured[name] = (layer, inputs[name], routing[name])


def default_layers(names: Sequence[str]) -> list[str]:
    """The last BRA layer of each stage (``stages.<i>....``), in model order; other names are all kept."""
    last_of_group: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "stages" and len(parts) > 2 else name
        last_of_group[group] = name
    return list(last_of_group.values())


def _check_points(points: Sequence[Point], image_size: tuple[int, int]) -> list[Point]:
    width, height = image_size
    if len(points) == 0:
        raise ValueError("points: expected at least one (x, y) query point, got none")
    checked = []
    for point in points:
        if len(point) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in point):
            raise ValueError(f"points: expected (x, y) pairs of finite numbers, got {point!r}")
        x, y = float(point[0]), float(point[1])
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"points: ({x:g}, {y:g}) is outside the {width}x{height} image (expected 0 <= x < {width}, "
                f"0 <= y < {height}, in pixels of the original image)"
            )
        checked.append((x, y))
    return checked


def _load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)


def explain_routing(
    model: nn.Module,
    image: Image.Image | str | os.PathLike,
    points: Sequence[Point],
    layers: Sequence[str] | None = None,
    image_size: int | None = None,
) -> list[list[RoutingPanel]]:
    """Run ``model`` on ``image`` and describe, for each point and BRA layer, the query token's region, its
    routed regions and its attention.

    Args:
        model: a network containing BRA layers (any BiFormer; the model runs in eval mode, its mode is
            restored afterwards).
        image: a PIL image or an image file.
        points: query points (x, y) in pixels of the original image.
        layers: BRA module names to show (default: the last BRA layer of each stage).
        image_size: shorter side of the model input in pixels (default: the model's pretrained input size);
            see :func:`prepare_image`.

    Returns:
        ``panels[point_index][layer_index]``.

    Raises:
        ValueError: a point outside the image, an unknown layer name, a model without BRA layers.
    """
    image = _load_image(image)
    points = _check_points(points, image.size)
    parameter = next(model.parameters(), None)
    images = prepare_image(image, model, image_size)  # (1, 3, H, W)
    if parameter is not None:
        images = images.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_routing(model) as captured:
            model(images)
    finally:
        model.train(was_training)
    if not captured:
        raise ValueError(f"model: {type(model).__name__} has no Bi-Level Routing Attention layer to show")
    if layers is None:
        layers = default_layers(list(captured))
    unknown = [name for name in layers if name not in captured]
    if unknown or not layers:
        raise ValueError(f"layers: expected names from {list(captured)}, got {list(layers)!r}")
    return [[_panel(name, *captured[name], point, image.size) for name in layers] for point in points]


def _panel(
    name: str, layer: nn.Module, x: torch.Tensor, topk_index: torch.Tensor, point: Point, image_size: tuple[int, int]
) -> RoutingPanel:
    map_size = tuple(x.shape[2:4]) if isinstance(layer, BiLevelRoutingAttentionNCHW) else tuple(x.shape[1:3])
    token = token_at(point, image_size, map_size)
    attention = token_attention(layer, x, topk_index, *token)
    return RoutingPanel(
        layer=name,
        point=point,
        image_size=image_size,
        token=token,
        grid=attention.grid,
        query_region=attention.query_region,
        routed_regions=attention.routed_regions.tolist(),
        heat=attention.heat.float().mean(dim=0).cpu(),
    )
