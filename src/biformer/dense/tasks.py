"""Dense tasks as self-contained objects a training loop can drive without knowing the task.

A task gives: ``build_model()``, ``train_dataset`` / ``val_dataset``, ``collate_fn`` (for a DataLoader),
``loss(model, batch) -> (loss, parts)`` in training mode, and ``evaluate(model, loader) -> metrics`` whose
``metrics[task.main_metric]`` ranks checkpoints (higher is better). Batches are moved to the model's device
inside ``loss`` and ``evaluate``.

Example::

    task = SegmentationTask.scenes(variant=MICRO, train_scenes=4000)
    model = task.build_model()
    loader = DataLoader(task.train_dataset, batch_size=8, shuffle=True, collate_fn=task.collate_fn)
    for batch in loader:
        loss, parts = task.loss(model, batch)
        ...
    metrics = task.evaluate(model, DataLoader(task.val_dataset, batch_size=8, collate_fn=task.collate_fn))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .detection import maskrcnn_biformer, retinanet_biformer
from .loaders import detection_collate, segmentation_collate
from .metrics import SegmentationMetric, detection_metric, detection_summary, prepare_for_metric
from .scenes import SceneDataset
from .segmentation import semantic_fpn_biformer, upernet_biformer

__all__ = ["DetectionTask", "SegmentationTask"]

DETECTION_ARCHITECTURES = {"maskrcnn": maskrcnn_biformer, "retinanet": retinanet_biformer}
SEGMENTATION_ARCHITECTURES = {"semantic_fpn": semantic_fpn_biformer, "upernet": upernet_biformer}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_architecture(architecture: str, known: Mapping) -> str:
    if architecture not in known:
        raise ValueError(f"architecture: expected one of {sorted(known)}, got {architecture!r}")
    return architecture


def _scene_datasets(
    task: str, train_scenes: int, val_scenes: int, image_size: int, seed: int, root: str | os.PathLike | None,
) -> tuple[SceneDataset, SceneDataset]:
    """Train scenes from Fashion-MNIST's train crops, validation scenes from its (disjoint) test crops."""
    train = SceneDataset.from_fashion_mnist("train", train_scenes, root, task=task, seed=seed, image_size=image_size)
    val = SceneDataset.from_fashion_mnist("test", val_scenes, root, task=task, seed=seed + 1, image_size=image_size)
    return train, val


class SegmentationTask:
    """Semantic segmentation: per-pixel cross-entropy (``ignore_index`` skipped), evaluated by mIoU.

    Args:
        train_dataset, val_dataset: items (image float (3, H, W) in [0, 1], mask int64 (H, W)).
        num_classes: classes (background included when it is a class).
        architecture: ``"semantic_fpn"`` or ``"upernet"``.
        variant: backbone name or dict of :class:`biformer.BiFormer` arguments.
        model_options: more arguments of the builder (``checkpoint``, ``backbone_options``, ``head_options``).
        ignore_index: mask value excluded from loss and metric.
    """

    name = "segmentation"
    main_metric = "mIoU"

    def __init__(
        self, train_dataset: Dataset, val_dataset: Dataset, num_classes: int, architecture: str = "semantic_fpn",
        variant: str | Mapping = "biformer_small", model_options: Mapping | None = None, ignore_index: int = 255,
    ) -> None:
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.num_classes = num_classes
        self.architecture = _check_architecture(architecture, SEGMENTATION_ARCHITECTURES)
        self.variant, self.model_options = variant, dict(model_options or {})
        self.ignore_index = ignore_index
        self.collate_fn = functools.partial(segmentation_collate, ignore_index=ignore_index)

    @classmethod
    def scenes(
        cls, train_scenes: int = 4000, val_scenes: int = 500, image_size: int = 128, seed: int = 0,
        root: str | os.PathLike | None = None, **kwargs: Any,
    ) -> SegmentationTask:
        """The task on the built-in Fashion-MNIST scenes (11 classes: background + 10)."""
        train, val = _scene_datasets("segmentation", train_scenes, val_scenes, image_size, seed, root)
        return cls(train, val, train.num_classes, **kwargs)

    def build_model(self) -> nn.Module:
        builder = SEGMENTATION_ARCHITECTURES[self.architecture]
        return builder(self.variant, self.num_classes, **self.model_options)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        device = _device(model)
        images, masks = batch[0].to(device), batch[1].to(device)
        loss = F.cross_entropy(model(images), masks, ignore_index=self.ignore_index)  # logits (N, K, H, W)
        return loss, {"cross_entropy": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """mIoU (all classes), mIoU_no_background, pixel_accuracy over ``loader``."""
        was_training = model.training
        model.eval()
        metric = SegmentationMetric(self.num_classes, self.ignore_index)
        device = _device(model)
        for images, masks in loader:
            metric.update(model(images.to(device)).argmax(dim=1), masks)
        model.train(was_training)
        return metric.compute()


class DetectionTask:
    """Object detection (and instance segmentation with Mask R-CNN) with torchvision's detectors.

    Args:
        train_dataset, val_dataset: items (image float (3, H, W) in [0, 1], target dict with ``boxes``,
            ``labels`` and, for Mask R-CNN, ``masks``), e.g. :class:`SceneDataset` or
            :class:`~biformer.dense.loaders.CocoDetectionDataset`.
        num_classes: including the background (labels are 1..num_classes-1).
        architecture: ``"maskrcnn"`` or ``"retinanet"``.
        variant: backbone name or dict of :class:`biformer.BiFormer` arguments.
        model_options: more builder arguments (``min_size``, ``max_size``, ``checkpoint``, ``backbone_options``,
            ``fpn_channels``, ``anchor_sizes``, torchvision's options ...).

    The loss is the sum of the detector's losses; ``evaluate`` gives COCO mAP, mAP@0.5 (the main metric) and
    mAP@0.75 for boxes, and for Mask R-CNN the same for masks (``mask_mAP`` ...).
    """

    name = "detection"
    main_metric = "mAP@0.5"

    def __init__(
        self, train_dataset: Dataset, val_dataset: Dataset, num_classes: int, architecture: str = "maskrcnn",
        variant: str | Mapping = "biformer_small", model_options: Mapping | None = None,
    ) -> None:
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.num_classes = num_classes
        self.architecture = _check_architecture(architecture, DETECTION_ARCHITECTURES)
        self.variant, self.model_options = variant, dict(model_options or {})
        self.collate_fn = detection_collate

    @classmethod
    def scenes(
        cls, train_scenes: int = 4000, val_scenes: int = 500, image_size: int = 128, seed: int = 0,
        root: str | os.PathLike | None = None, **kwargs: Any,
    ) -> DetectionTask:
        """The task on the built-in Fashion-MNIST scenes (10 classes + background); images are kept at their
        size (``min_size`` = ``max_size`` = ``image_size`` unless ``model_options`` says otherwise)."""
        train, val = _scene_datasets("detection", train_scenes, val_scenes, image_size, seed, root)
        options = {"min_size": image_size, "max_size": image_size, **kwargs.pop("model_options", {})}
        return cls(train, val, train.num_classes, model_options=options, **kwargs)

    @property
    def with_masks(self) -> bool:
        return self.architecture == "maskrcnn"

    def build_model(self) -> nn.Module:
        builder = DETECTION_ARCHITECTURES[self.architecture]
        return builder(self.variant, self.num_classes, **self.model_options)

    def _to_device(self, batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
        images, targets = batch
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        return images, targets

    def loss(self, model: nn.Module, batch: tuple[list, list]) -> tuple[torch.Tensor, dict]:
        images, targets = self._to_device(batch, _device(model))
        losses = model(images, targets)  # dict of scalar losses (training mode)
        return sum(losses.values()), {name: float(value.detach()) for name, value in losses.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """COCO-style mAP over ``loader`` (pycocotools through torchmetrics)."""
        was_training = model.training
        model.eval()
        metric = detection_metric(with_masks=self.with_masks)
        device = _device(model)
        for batch in loader:
            images, targets = self._to_device(batch, device)
            metric.update(*prepare_for_metric(model(images), targets, self.with_masks))
        model.train(was_training)
        return detection_summary(metric.compute())
