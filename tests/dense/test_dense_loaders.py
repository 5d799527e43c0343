"""COCO-format and image/mask-folder loaders, collate functions, and the dense tasks on generated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense_helpers import TINY, generated_crops, write_coco, write_mask_folder
from PIL import Image
from torch.utils.data import DataLoader

from biformer.dense import SceneDataset
from biformer.dense.loaders import CocoDetectionDataset, MaskFolderDataset, detection_collate, segmentation_collate
from biformer.dense.tasks import DetectionTask, SegmentationTask
from biformer.images import ImageError


def test_coco_loader_gives_torchvision_targets(tmp_path):
    write_coco(tmp_path)
    dataset = CocoDetectionDataset(tmp_path, tmp_path / "instances.json")
    assert len(dataset) == 2 and dataset.num_classes == 3 and dataset.class_names == ("background", "cat", "dog")
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and image.max() <= 1
    assert target["boxes"].tolist() == [[5, 4, 15, 10], [20, 10, 28, 18]]  # crowd dropped, xywh -> xyxy
    assert target["labels"].tolist() == [2, 1]  # category 7 -> 2, 3 -> 1
    assert target["masks"].shape == (2, 30, 40) and target["masks"].dtype == torch.uint8
    assert target["masks"][0, 5:9, 6:14].all() and not target["masks"][0, 15:, :].any()
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)
    raw_ids = CocoDetectionDataset(tmp_path, tmp_path / "instances.json", with_masks=False, contiguous_labels=False)
    assert raw_ids.num_classes == 8 and raw_ids[0][1]["labels"].tolist() == [7, 3] and "masks" not in raw_ids[0][1]


def test_coco_loader_errors(tmp_path):
    write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation_file"):
        CocoDetectionDataset(tmp_path, tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match="image_dir"):
        CocoDetectionDataset(tmp_path / "absent", tmp_path / "instances.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not COCO-format JSON"):
        CocoDetectionDataset(tmp_path, tmp_path / "broken.json")


def test_mask_folder_and_padding_collate(tmp_path):
    images, masks = write_mask_folder(tmp_path)
    dataset = MaskFolderDataset(images, masks, num_classes=3)
    image, mask = dataset[0]
    assert image.shape == (3, 20, 30) and mask.shape == (20, 30) and mask[0, :4].tolist() == [0, 1, 2, 0]
    batch_images, batch_masks = segmentation_collate([dataset[0], dataset[1]])
    assert batch_images.shape == (2, 3, 24, 30) and batch_masks.shape == (2, 24, 30)
    assert (batch_masks[0, 20:] == 255).all() and (batch_masks[1, :, 16:] == 255).all()


def test_mask_folder_errors(tmp_path):
    images, masks = write_mask_folder(tmp_path)
    with pytest.raises(ImageError, match="class ids"):
        MaskFolderDataset(images, masks, num_classes=2)[0]
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(masks / "0.png")
    with pytest.raises(ImageError, match="single-channel"):
        MaskFolderDataset(images, masks, num_classes=3)[0]
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(masks / "0.png")
    with pytest.raises(ImageError, match="its image"):
        MaskFolderDataset(images, masks, num_classes=3)[0]
    (masks / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1.jpg"):
        MaskFolderDataset(images, masks, num_classes=3)
    with pytest.raises(FileNotFoundError, match="mask_dir"):
        MaskFolderDataset(images, tmp_path / "absent", num_classes=3)


def scene_sets(task: str):
    crops, labels = generated_crops()
    return (SceneDataset(crops, labels, 4, task=task, image_size=48, seed=0),
            SceneDataset(crops, labels, 2, task=task, image_size=48, seed=1))


def test_segmentation_task_drives_a_training_step_and_evaluation():
    train, val = scene_sets("segmentation")
    task = SegmentationTask(train, val, train.num_classes, architecture="upernet", variant=TINY,
                            model_options=dict(backbone_options=dict(n_win=2), head_options=dict(channels=16)))
    model = task.build_model()
    loss, parts = task.loss(model, next(iter(DataLoader(train, batch_size=2, collate_fn=task.collate_fn))))
    loss.backward()
    assert loss.requires_grad and set(parts) == {"cross_entropy"}
    metrics = task.evaluate(model, DataLoader(val, batch_size=2, collate_fn=task.collate_fn))
    assert 0 <= metrics[task.main_metric] <= 1 and model.training


def test_detection_task_drives_a_training_step_and_evaluation():
    train, val = scene_sets("detection")
    options = dict(backbone_options=dict(n_win=2), fpn_channels=16, min_size=48, max_size=48,
                   representation_size=32, mask_head_channels=8)
    task = DetectionTask(train, val, train.num_classes, architecture="maskrcnn", variant=TINY, model_options=options)
    model = task.build_model().train()
    loss, parts = task.loss(model, detection_collate([train[0], train[1]]))
    loss.backward()
    assert "loss_mask" in parts and torch.isfinite(loss)
    metrics = task.evaluate(model, DataLoader(val, batch_size=2, collate_fn=task.collate_fn))
    assert {"mAP@0.5", "mask_mAP@0.5"} <= set(metrics) and model.training


def test_task_errors(tmp_path):
    train, val = scene_sets("detection")
    with pytest.raises(ValueError, match="architecture"):
        DetectionTask(train, val, 4, architecture="yolo")
    with pytest.raises(ValueError, match="architecture"):
        SegmentationTask(train, val, 4, architecture="deeplab")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        SegmentationTask.scenes(root=tmp_path)
