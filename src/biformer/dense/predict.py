"""Predictions of a dense model on one image: a class map (segmentation) or scored boxes (detection), and the
pictures ``biformer predict`` writes for them.

Images are float (3, H, W) in [0, 1]: the segmentation models and torchvision's detectors normalise inside.
Every file is written atomically (:func:`biformer.files.atomic_write`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .._optional import require
from ..files import atomic_write

__all__ = ["class_colours", "describe_class_map", "describe_detections", "detect", "save_class_map",
           "save_detections_picture", "save_overlay", "segment"]


def segment(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class id of every pixel: int64 (H, W) for an image (3, H, W) (any size)."""
    with torch.inference_mode():
        logits = model.eval()(image.unsqueeze(0))  # (1, classes, H, W)
    return logits.argmax(dim=1)[0]


def detect(model: nn.Module, image: torch.Tensor, score_threshold: float) -> dict[str, torch.Tensor]:
    """The detections of an image (3, H, W) scoring at least ``score_threshold``: ``boxes`` (K, 4) xyxy in
    pixels, ``labels`` (K,), ``scores`` (K,) and, for Mask R-CNN, ``masks`` (K, 1, H, W) probabilities."""
    with torch.inference_mode():
        detections = model.eval()([image])[0]
    keep = detections["scores"] >= score_threshold
    return {key: value[keep] for key, value in detections.items()}


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): black for class 0 (the background), then matplotlib's ``tab20`` colours."""
    table = require("matplotlib", extra="cli", purpose="colouring segmentation masks").colormaps["tab20"]
    colours = [(0.0, 0.0, 0.0)] + [table(index % 20)[:3] for index in range(num_classes - 1)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def _save_png(path: str | os.PathLike, picture: Image.Image) -> None:
    atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


def save_class_map(path: str | os.PathLike, class_map: torch.Tensor, num_classes: int) -> None:
    """A palette PNG whose pixel values are the class ids of ``class_map`` (H, W) (readable as a mask by
    :class:`~biformer.dense.loaders.MaskFolderDataset`), shown in :func:`class_colours`."""
    if num_classes > 256:
        raise ValueError(f"num_classes: a palette PNG holds at most 256 classes, got {num_classes}")
    picture = Image.fromarray(class_map.to(torch.uint8).cpu().numpy(), mode="L").convert("P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = class_colours(num_classes)
    picture.putpalette(palette.reshape(-1).tolist())
    _save_png(path, picture)


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()  # (3, H, W)


def save_overlay(path: str | os.PathLike, image: torch.Tensor, class_map: torch.Tensor, num_classes: int,
                 alpha: float = 0.5) -> None:
    """The image with every non-background pixel tinted in its class colour."""
    pixels = _as_uint8(image).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    ids = class_map.cpu().numpy()
    tint = class_colours(num_classes)[ids].astype(np.float32)  # (H, W, 3)
    blended = np.where((ids > 0)[..., None], (1 - alpha) * pixels + alpha * tint, pixels)
    _save_png(path, Image.fromarray(blended.round().astype(np.uint8)))


def save_detections_picture(path: str | os.PathLike, image: torch.Tensor, detections: dict[str, torch.Tensor],
                            class_names: list[str]) -> None:
    """The image with each detection's box and ``name score`` (and its mask, for Mask R-CNN) drawn."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    picture = _as_uint8(image)
    colours = [tuple(int(c) for c in class_colours(len(class_names))[label]) for label in detections["labels"]]
    if "masks" in detections and len(detections["masks"]):
        masks = detections["masks"][:, 0] > 0.5  # (K, H, W)
        picture = draw_segmentation_masks(picture, masks.cpu(), alpha=0.4, colors=colours)
    labels = [f"{class_names[label]} {score:.2f}" for label, score in
              zip(detections["labels"].tolist(), detections["scores"].tolist())]
    if len(labels):
        picture = draw_bounding_boxes(picture, detections["boxes"].cpu(), labels=labels, colors=colours)
    _save_png(path, Image.fromarray(picture.permute(1, 2, 0).numpy()))


def describe_detections(detections: dict[str, torch.Tensor], class_names: list[str]) -> list[dict[str, Any]]:
    """JSON-able list of ``{label, score, box}`` (box: x0, y0, x1, y1 in pixels), best first."""
    order = detections["scores"].argsort(descending=True)
    return [dict(label=class_names[int(detections["labels"][i])], score=float(detections["scores"][i]),
                 box=[round(float(v), 1) for v in detections["boxes"][i]]) for i in order]


def describe_class_map(class_map: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """JSON-able list of ``{label, fraction}``: the share of the pixels of each class present, largest first."""
    counts = torch.bincount(class_map.reshape(-1).cpu(), minlength=len(class_names)).double()
    shares = counts / counts.sum()
    order = [int(i) for i in shares.argsort(descending=True) if shares[i] > 0]
    return [dict(label=class_names[i], fraction=float(shares[i])) for i in order]
