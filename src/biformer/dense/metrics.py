"""Evaluation metrics: mean IoU for segmentation, COCO-style mAP for detection (torchmetrics + pycocotools)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SegmentationMetric", "detection_metric", "detection_summary"]


class SegmentationMetric:
    """Accumulates a confusion matrix over batches; reports pixel accuracy, per-class IoU and mean IoU.

    IoU of class c = TP / (TP + FP + FN); classes absent from both predictions and targets of everything seen
    (union 0) are left out of the mean (as mmsegmentation). Target pixels equal to ``ignore_index`` are skipped.

    Args:
        num_classes: classes, background included when it is a class (Pascal VOC convention).
        ignore_index: target value to skip (255 as in mmsegmentation), or None.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, prediction]

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` int (N, H, W) class ids or float logits (N, num_classes, H, W);
        ``target`` int (N, H, W)."""
        if prediction.is_floating_point():
            prediction = prediction.argmax(dim=1)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction: expected the target's shape {tuple(target.shape)}, "
                             f"got {tuple(prediction.shape)}")
        keep = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        target, prediction = target[keep].long().cpu(), prediction[keep].long().cpu()
        if len(target) and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target: class ids must be in 0..{self.num_classes - 1} or ignore_index "
                             f"{self.ignore_index}, got values in {int(target.min())}..{int(target.max())}")
        pairs = target * self.num_classes + prediction  # one id per (target, prediction) pair
        self.confusion += torch.bincount(pairs, minlength=self.num_classes**2).view(self.num_classes, -1)

    def sums(self) -> list[torch.Tensor]:
        """The state (the confusion matrix), which adds up across processes in distributed evaluation."""
        return [self.confusion]

    def per_class_iou(self) -> torch.Tensor:
        """float64 (num_classes,); NaN where a class was never seen nor predicted."""
        confusion = self.confusion.double()
        true_positive = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)

    def compute(self) -> dict[str, float]:
        """``mIoU`` (over all classes), ``mIoU_no_background`` (classes 1..), ``pixel_accuracy``."""
        iou = self.per_class_iou()
        total = self.confusion.sum()
        return {
            "mIoU": float(iou.nanmean()),
            "mIoU_no_background": float(iou[1:].nanmean()) if self.num_classes > 1 else float("nan"),
            "pixel_accuracy": float(self.confusion.diagonal().sum() / total) if total else float("nan"),
        }


def detection_metric(with_masks: bool = False) -> torch.nn.Module:
    """torchmetrics' ``MeanAveragePrecision`` (pycocotools backend: the COCO evaluation itself), for boxes
    and, with ``with_masks``, instance masks. Needs ``pip install "biformer[dense]"``."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            'detection mAP needs torchmetrics and pycocotools: pip install "biformer[dense]"'
        ) from error
    return MeanAveragePrecision(iou_type=("bbox", "segm") if with_masks else "bbox", backend="pycocotools")


def prepare_for_metric(
    outputs: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]], with_masks: bool
) -> tuple[list[dict], list[dict]]:
    """torchvision detector outputs and targets in the form ``MeanAveragePrecision.update`` takes (boolean
    (K, H, W) masks; predicted mask probabilities thresholded at 0.5)."""
    predictions, references = [], []
    for output, target in zip(outputs, targets):
        prediction = {key: output[key].detach().cpu() for key in ("boxes", "scores", "labels")}
        reference = {key: target[key].cpu() for key in ("boxes", "labels")}
        if with_masks:
            prediction["masks"] = output["masks"].detach().cpu()[:, 0] > 0.5  # (K, 1, H, W) -> (K, H, W)
            reference["masks"] = target["masks"].cpu().bool()
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def detection_summary(results: dict[str, torch.Tensor]) -> dict[str, float]:
    """Plain floats from ``MeanAveragePrecision.compute()``: ``mAP``, ``mAP@0.5``, ``mAP@0.75`` for boxes,
    and ``mask_mAP``, ``mask_mAP@0.5`` when masks were evaluated."""
    names = {"map": "mAP", "map_50": "mAP@0.5", "map_75": "mAP@0.75"}
    summary = {}
    for prefix, label in (("", ""), ("bbox_", ""), ("segm_", "mask_")):
        for key, name in names.items():
            if prefix + key in results:
                summary[label + name] = float(results[prefix + key])
    return summary
