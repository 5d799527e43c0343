"""The pictures and summaries of ``biformer.dense.predict`` against what they are drawn from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from biformer.dense import predict


def test_class_map_png_holds_the_class_ids_and_the_overlay_tints_only_objects(tmp_path):
    class_map = torch.zeros(6, 5, dtype=torch.int64)
    class_map[1:3, 1:4] = 2
    class_map[5, 0] = 1
    predict.save_class_map(tmp_path / "classes.png", class_map, num_classes=3)
    written = Image.open(tmp_path / "classes.png")
    assert written.mode == "P" and np.array_equal(np.array(written), class_map.numpy())
    assert written.getpalette()[:9] == predict.class_colours(3).reshape(-1).tolist()
    image = torch.full((3, 6, 5), 0.5)
    predict.save_overlay(tmp_path / "overlay.png", image, class_map, num_classes=3)
    overlay = np.array(Image.open(tmp_path / "overlay.png")).astype(int)  # (6, 5, 3)
    assert (overlay[0, 0] == 128).all()  # background untouched
    expected = np.round(0.5 * 128 + 0.5 * predict.class_colours(3)[2])
    assert np.abs(overlay[1, 1] - expected).max() <= 1
    summary = predict.describe_class_map(class_map, ["background", "a", "b"])
    assert [item["label"] for item in summary] == ["background", "b", "a"]
    assert [item["fraction"] for item in summary] == pytest.approx([23 / 30, 6 / 30, 1 / 30])
    with pytest.raises(ValueError, match="num_classes: a palette PNG holds at most 256 classes, got 300"):
        predict.save_class_map(tmp_path / "x.png", class_map, num_classes=300)


def test_detections_picture_draws_boxes_and_masks(tmp_path):
    image = torch.zeros(3, 40, 50)
    masks = torch.zeros(2, 1, 40, 50)
    masks[0, 0, 10:20, 10:20] = 0.9
    detections = dict(boxes=torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 5.0, 45.0, 35.0]]),
                      labels=torch.tensor([1, 2]), scores=torch.tensor([0.6, 0.9]), masks=masks)
    predict.save_detections_picture(tmp_path / "d.png", image, detections, ["background", "bag", "boot"])
    picture = np.array(Image.open(tmp_path / "d.png"))  # (40, 50, 3)
    assert picture.shape == (40, 50, 3)
    assert picture[15, 15].any() and not picture[38, 2].any()  # inside the first mask; far from everything
    assert picture[20, 30].any()  # the second box's left edge
    described = predict.describe_detections(detections, ["background", "bag", "boot"])
    assert described == [dict(label="boot", score=pytest.approx(0.9), box=[30.0, 5.0, 45.0, 35.0]),
                         dict(label="bag", score=pytest.approx(0.6), box=[10.0, 10.0, 20.0, 20.0])]
