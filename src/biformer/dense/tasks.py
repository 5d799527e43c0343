"""Dense tasks as self-contained objects: the single implementation of loss and evaluation for segmentation
and detection, driven by ``biformer train`` (through :mod:`biformer.dense.engine_tasks`) and by
``benchmarks/dense_train.py``.

A task gives: ``build_model()``, ``train_dataset`` / ``val_dataset``, ``collate_fn`` (for a DataLoader),
``loss(model, batch) -> (loss, parts)`` in training mode, ``new_metrics()`` (an evaluation accumulator with
the engine's :class:`~biformer.train.task.MetricSums` interface) and ``evaluate(model, loader) -> metrics``
whose ``metrics[task.main_metric]`` ranks checkpoints (higher is better). Batches are moved to the model's
device inside ``loss`` and the accumulators.

Example::

    task = SegmentationTask.scenes(variant=SHALLOW, train_scenes=4000)
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
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..train.task import MetricSums
from .detection import maskrcnn_biformer, retinanet_biformer
from .loaders import detection_collate, segmentation_collate
from .metrics import SegmentationMetric, detection_metric, detection_summary, prepare_for_metric
from .scenes import SceneDataset
from .segmentation import AUXILIARY_LOSS_WEIGHT, semantic_fpn_biformer, upernet_biformer

__all__ = [
    "MICRO",
    "PRESETS",
    "SHALLOW",
    "CachedDataset",
    "DetectionMetrics",
    "DetectionTask",
    "SegmentationMetrics",
    "SegmentationTask",
    "cpu_model_options",
]

DETECTION_ARCHITECTURES = {"maskrcnn": maskrcnn_biformer, "retinanet": retinanet_biformer}
SEGMENTATION_ARCHITECTURES = {"semantic_fpn": semantic_fpn_biformer, "upernet": upernet_biformer}

# A small BiFormer (about 3.4 M parameters) that trains in minutes on 2 CPU cores; same block design as
# biformer_tiny (BRA with topk 1, 4, 16 in stages 1-3, attention with LePE in stage 4), narrower and shallower.
MICRO = dict(
    depth=[2, 2, 4, 2], embed_dim=[32, 64, 128, 256], qk_dims=[32, 64, 128, 256], head_dim=32,
    topks=[1, 4, 16, -2], mlp_ratios=[3, 3, 3, 3],
)
# Half MICRO's depth: about twice the steps in the same time (biformer_nano's layout with 32-channel heads).
SHALLOW = dict(MICRO, depth=[1, 1, 2, 1])
# Backbone presets by name (``biformer train --model shallow``), besides biformer_tiny/small/base.
PRESETS = {"shallow": SHALLOW, "micro": MICRO}


def cpu_model_options(
    task: str, architecture: str, head_channels: int | None = None, backbone_options: Mapping | None = None,
    auxiliary_head: bool = False,
) -> dict[str, Any]:
    """Builder arguments of the small CPU recipe measured in benchmarks/RESULTS.md (narrow heads, few sampled RoIs: on
    CPU the heads' convolutions and RoIAlign dominate a step).

    Segmentation: head width ``head_channels`` (default 64; Semantic FPN: FPN and branches, UperNet: every
    branch), UperNet's auxiliary head when asked. Detection: FPN 64 channels, anchors 16-256 px; Mask R-CNN
    with a 256-wide box head, a 64-channel mask head and fewer proposals.
    """
    options: dict[str, Any] = {"backbone_options": dict(backbone_options or {})}
    if task == "segmentation":
        width = head_channels or 64
        options["head_options"] = (dict(fpn_channels=width, channels=width) if architecture == "semantic_fpn"
                                   else dict(channels=width))
        if architecture == "upernet":
            options["auxiliary_head"] = dict(channels=width) if auxiliary_head else False
        return options
    options.update(fpn_channels=head_channels or 64, anchor_sizes=(16, 32, 64, 128, 256))
    if architecture == "maskrcnn":
        options.update(representation_size=256, mask_head_channels=64, rpn_pre_nms_top_n_train=600,
                       rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                       box_batch_size_per_image=64)
    return options


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_architecture(architecture: str, known: Mapping) -> str:
    if architecture not in known:
        raise ValueError(f"architecture: expected one of {sorted(known)}, got {architecture!r}")
    return architecture


class CachedDataset(Dataset):
    """Every item of ``dataset`` computed once (e.g. composed scenes); float images in [0, 1] are kept as
    uint8 (a quarter of the memory) and restored on access. Items: as ``dataset``'s."""

    def __init__(self, dataset: Dataset) -> None:
        self.items = [(image.mul(255).round().to(torch.uint8), target) for image, target in dataset]
        for name in ("num_classes", "class_names"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.items[index]
        return image.float().div(255), target


def _scene_datasets(
    task: str, train_scenes: int, val_scenes: int, image_size: int, seed: int, root: str | os.PathLike | None,
) -> tuple[SceneDataset, SceneDataset]:
    """Train scenes from Fashion-MNIST's train crops, validation scenes from its (disjoint) test crops."""
    train = SceneDataset.from_fashion_mnist("train", train_scenes, root, task=task, seed=seed, image_size=image_size)
    val = SceneDataset.from_fashion_mnist("test", val_scenes, root, task=task, seed=seed + 1, image_size=image_size)
    return train, val


class SegmentationMetrics(MetricSums):
    """Evaluation accumulator of segmentation: a confusion matrix (summed over processes).

    ``compute()``: ``mIoU``, ``mIoU_no_background``, ``pixel_accuracy``, ``pixels`` and ``per_class_IoU``
    (a list; NaN for classes never seen nor predicted).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.metric = SegmentationMetric(num_classes, ignore_index)

    def update(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``batch``: images (N, 3, H, W), masks int64 (N, H, W)."""
        device = _device(model)
        images, masks = batch[0].to(device), batch[1]
        self.metric.update(model(images).argmax(dim=1), masks)  # logits (N, K, H, W) -> ids (N, H, W)

    def sums(self) -> list[torch.Tensor]:
        return self.metric.sums()

    def compute(self) -> dict[str, Any]:
        return {**self.metric.compute(), "pixels": int(self.metric.confusion.sum()),
                "per_class_IoU": self.metric.per_class_iou().tolist()}


class DetectionMetrics(MetricSums):
    """Evaluation accumulator of detection: torchmetrics' ``MeanAveragePrecision`` (pycocotools).

    Its state (per-image detections and ground truths) does not add up across processes: :meth:`gather`
    concatenates every process's lists (the images of the processes are disjoint) before :meth:`compute`.
    """

    def __init__(self, with_masks: bool) -> None:
        self.with_masks = with_masks
        self.metric = detection_metric(with_masks=with_masks)
        self.metric.sync_on_compute = False  # gathered explicitly by ``gather``
        self.images = 0

    def update(self, model: nn.Module, batch: tuple[list, list]) -> None:
        """``batch``: a list of images (3, H, W) and a list of target dicts (torchvision's format)."""
        images, targets = _detection_to_device(batch, _device(model))
        self.metric.update(*prepare_for_metric(model(images), targets, self.with_masks))
        self.images += len(images)

    def sums(self) -> list[torch.Tensor]:
        return []

    def gather(self, gather_objects: Callable[[Any], list[Any]]) -> None:
        """Replace each list state by the concatenation of every process's (rank order)."""
        for name, value in self.metric.metric_state.items():
            setattr(self.metric, name, [item for part in gather_objects(list(value)) for item in part])
        self.images = sum(gather_objects(self.images))

    def compute(self) -> dict[str, Any]:
        if self.images == 0:
            raise ValueError("metrics: no images were evaluated")
        return {**detection_summary(self.metric.compute()), "images": self.images}


def _evaluate(model: nn.Module, loader: DataLoader, metrics: MetricSums) -> dict[str, Any]:
    """``metrics`` over ``loader`` in one process (the engine does the same across processes)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            metrics.update(model, batch)
    model.train(was_training)
    metrics.gather(lambda value: [value])
    return metrics.compute()


class SegmentationTask:
    """Semantic segmentation: per-pixel cross-entropy (``ignore_index`` skipped), evaluated by mIoU.

    Args:
        train_dataset, val_dataset: items (image float (3, H, W) in [0, 1], mask int64 (H, W)); either may be
            None when only the model, loss or metrics are needed.
        num_classes: classes (background included when it is a class).
        architecture: ``"semantic_fpn"`` or ``"upernet"``.
        variant: backbone name or dict of :class:`biformer.BiFormer` arguments.
        model_options: more arguments of the builder (``checkpoint``, ``backbone_options``, ``head_options``,
            UperNet's ``auxiliary_head``).
        ignore_index: mask value excluded from loss and metric.

    With UperNet's auxiliary head the loss is ``CE(main) + 0.4 * CE(auxiliary)`` (mmseg's weight).
    """

    name = "segmentation"
    main_metric = "mIoU"

    def __init__(
        self, train_dataset: Dataset | None, val_dataset: Dataset | None, num_classes: int,
        architecture: str = "semantic_fpn", variant: str | Mapping = "biformer_small",
        model_options: Mapping | None = None, ignore_index: int = 255,
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
        output = model(images)  # logits (N, K, H, W), or (logits, auxiliary logits) with an auxiliary head
        logits, auxiliary = output if isinstance(output, tuple) else (output, None)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        parts = {"cross_entropy": float(loss.detach())}
        if auxiliary is not None:
            auxiliary_loss = F.cross_entropy(auxiliary.float(), masks, ignore_index=self.ignore_index)
            parts["auxiliary_cross_entropy"] = float(auxiliary_loss.detach())
            loss = loss + AUXILIARY_LOSS_WEIGHT * auxiliary_loss
        return loss, parts

    def new_metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.num_classes, self.ignore_index)

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """mIoU (all classes), mIoU_no_background, pixel_accuracy (and per-class IoU) over ``loader``."""
        return _evaluate(model, loader, self.new_metrics())


def _detection_to_device(batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
    images, targets = batch
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


class DetectionTask:
    """Object detection (and instance segmentation with Mask R-CNN) with torchvision's detectors.

    Args:
        train_dataset, val_dataset: items (image float (3, H, W) in [0, 1], target dict with ``boxes``,
            ``labels`` and, for Mask R-CNN, ``masks``), e.g. :class:`SceneDataset` or
            :class:`~biformer.dense.loaders.CocoDetectionDataset`; either may be None.
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
        self, train_dataset: Dataset | None, val_dataset: Dataset | None, num_classes: int,
        architecture: str = "maskrcnn", variant: str | Mapping = "biformer_small",
        model_options: Mapping | None = None,
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

    def loss(self, model: nn.Module, batch: tuple[list, list]) -> tuple[torch.Tensor, dict]:
        images, targets = _detection_to_device(batch, _device(model))
        losses = model(images, targets)  # dict of scalar losses (training mode)
        return sum(losses.values()), {name: float(value.detach()) for name, value in losses.items()}

    def new_metrics(self) -> DetectionMetrics:
        return DetectionMetrics(self.with_masks)

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """COCO-style mAP over ``loader`` (pycocotools through torchmetrics)."""
        return _evaluate(model, loader, self.new_metrics())
