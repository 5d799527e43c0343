"""mIoU against a plain per-class loop; detection mAP on cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from biformer.dense.metrics import SegmentationMetric, detection_metric, detection_summary, prepare_for_metric


def plain_miou(predictions: list[torch.Tensor], targets: list[torch.Tensor], num_classes: int, ignore: int) -> float:
    """Mean over classes with a non-empty union of |P & T| / |P | T|, pixel sets counted in Python."""
    intersections, unions = [0] * num_classes, [0] * num_classes
    for prediction, target in zip(predictions, targets):
        for p, t in zip(prediction.flatten().tolist(), target.flatten().tolist()):
            if t == ignore:
                continue
            for c in range(num_classes):
                intersections[c] += (p == c) and (t == c)
                unions[c] += (p == c) or (t == c)
    values = [i / u for i, u in zip(intersections, unions) if u > 0]
    return sum(values) / len(values)


def test_miou_matches_a_plain_loop_over_batches():
    generator = torch.Generator().manual_seed(0)
    metric = SegmentationMetric(num_classes=5, ignore_index=255)
    predictions, targets = [], []
    for _ in range(3):
        target = torch.randint(0, 4, (2, 7, 9), generator=generator)  # class 4 never in targets
        target[:, 0, :3] = 255
        logits = torch.randn(2, 5, 7, 9, generator=generator)
        logits[:, 4] -= 10  # and (almost surely) never predicted: left out of the mean
        metric.update(logits, target)
        predictions.append(logits.argmax(dim=1))
        targets.append(target)
    result = metric.compute()
    assert math.isclose(result["mIoU"], plain_miou(predictions, targets, 5, 255), rel_tol=1e-12)
    assert torch.isnan(metric.per_class_iou()[4])
    assert 0 < result["pixel_accuracy"] < 1


def test_perfect_prediction_and_background_split():
    target = torch.tensor([[[0, 0, 1], [2, 2, 1]]])
    metric = SegmentationMetric(num_classes=3)
    metric.update(target.clone(), target)
    assert metric.compute() == {"mIoU": 1.0, "mIoU_no_background": 1.0, "pixel_accuracy": 1.0}
    wrong = SegmentationMetric(num_classes=3)
    wrong.update(torch.zeros_like(target), target)  # everything called background
    result = wrong.compute()
    assert result["mIoU_no_background"] == 0.0 and math.isclose(result["mIoU"], (2 / 6) / 3)


def test_segmentation_metric_errors():
    metric = SegmentationMetric(num_classes=3)
    with pytest.raises(ValueError, match="class ids"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetric(0)


def box_case(predicted_box: list[float], predicted_label: int) -> dict[str, float]:
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 10:50, 10:50] = 1
    mask = torch.zeros(1, 1, 64, 64)
    x0, y0, x1, y1 = (int(v) for v in predicted_box)
    mask[0, 0, y0:y1, x0:x1] = 0.9
    output = {"boxes": torch.tensor([predicted_box]), "labels": torch.tensor([predicted_label]),
              "scores": torch.tensor([0.8]), "masks": mask}
    metric = detection_metric(with_masks=True)
    metric.update(*prepare_for_metric([output], [target], with_masks=True))
    return detection_summary(metric.compute())


def test_detection_map_on_known_cases():
    exact = box_case([10.0, 10.0, 50.0, 50.0], 1)
    assert exact["mAP@0.5"] == pytest.approx(1.0) and exact["mask_mAP@0.5"] == pytest.approx(1.0)
    shifted = box_case([10.0, 22.0, 50.0, 62.0], 1)  # IoU 28 / 52 = 0.54: a hit at 0.5, a miss at 0.75
    assert shifted["mAP@0.5"] == pytest.approx(1.0) and shifted["mAP@0.75"] == pytest.approx(0.0)
    assert box_case([10.0, 10.0, 50.0, 50.0], 2)["mAP@0.5"] <= 0  # wrong class (-1 = class without prediction)


def test_sums_add_up_across_processes():
    """Two accumulators (as two processes) whose summed state equals one accumulator over all batches."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 3, (2, 1, 4, 4), generator=generator) for _ in range(4)]  # (prediction, target)
    whole, first, second = SegmentationMetric(3), SegmentationMetric(3), SegmentationMetric(3)
    for index, (prediction, target) in enumerate(batches):
        whole.update(prediction, target)
        (first if index % 2 else second).update(prediction, target)
    first.sums()[0] += second.sums()[0]
    assert first.compute() == whole.compute()
