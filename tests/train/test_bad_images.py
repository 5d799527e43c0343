"""Unreadable images in a dataset: skipped, replaced and counted (``bad_images: skip``), or the run stops at
the first naming the file (``bad_images: fail``); too many stop the run instead of training on what is left."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from biformer.cli import main
from biformer.dense.loaders import CocoDetectionDataset, MaskFolderDataset, detection_collate, segmentation_collate
from biformer.images import ImageError
from biformer.train import ConfigError, Trainer, load_config
from biformer.train.data import CsvImageDataset, DataError, SkipUnreadable, collate_classification, image_folder
from train.synthetic import as_flags, corrupt, make_csv_dataset, make_image_folder, micro_options


class Numbered(torch.utils.data.Dataset):
    """Items 0..size-1 as (index tensor, index); the indices in ``bad`` raise ImageError."""

    def __init__(self, size: int, bad: set[int]) -> None:
        self.size, self.bad = size, bad

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self.bad:
            raise ImageError(f"image: cannot read file-{index}.png (truncated)")
        return torch.tensor([float(index)]), index


def test_an_unreadable_item_is_replaced_by_the_next_readable_one():
    dataset = SkipUnreadable(Numbered(6, bad={2, 3, 5}), max_fraction=1.0)
    assert [dataset[i][1] for i in range(6)] == [0, 1, 4, 4, 4, 0]  # 5 wraps around to 0
    assert dataset.unreadable_indices() == [2, 3, 5] and len(dataset) == 6


def test_replacement_keeps_batch_sizes_and_worker_findings_reach_the_main_process():
    dataset = SkipUnreadable(Numbered(12, bad={1, 7}), max_fraction=0.5)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_classification)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [4, 4, 4]
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 2, 2, 3, 4, 5, 6, 8, 8, 9, 10, 11]
    assert dataset.unreadable_indices() == [1, 7]  # found in the worker processes


def test_fail_policy_names_the_file():
    dataset = SkipUnreadable(Numbered(4, bad={2}), policy="fail", split="eval")
    assert dataset[1][1] == 1
    with pytest.raises(ImageError, match=r"eval split: image: cannot read file-2.png .*set bad_images: skip"):
        dataset[2]


def test_too_many_unreadable_items_stop_with_a_clear_error():
    dataset = SkipUnreadable(Numbered(10, bad={3, 6}), max_fraction=0.1)
    assert dataset[3][1] == 4  # one in ten is allowed
    with pytest.raises(DataError, match=r"train split: 2 of 10 images are unreadable, more than max_bad_images 0.1"):
        dataset[6]
    with pytest.raises(DataError, match="none of its 3 images is readable"):
        SkipUnreadable(Numbered(3, bad={0, 1, 2}), max_fraction=1.0)[1]


@pytest.mark.parametrize("kwargs, message", [(dict(policy="ignore"), "bad_images: expected one of"),
                                             (dict(max_fraction=1.5), "max_bad_images: expected a fraction")])
def test_bad_wrapper_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SkipUnreadable(Numbered(2, bad=set()), **kwargs)


@pytest.mark.parametrize("values, message", [
    (dict(bad_images="ignore"), "option 'bad_images': expected 'skip' or 'fail', got 'ignore'"),
    (dict(max_bad_images=-0.1), "option 'max_bad_images': expected a fraction in [0, 1], got -0.1"),
])
def test_bad_image_options_are_validated(values, message):
    with pytest.raises(ConfigError) as error:
        load_config((values, "test"))
    assert message in str(error.value)


def test_real_files_csv_and_image_folder_name_the_file(tmp_path):
    root = make_csv_dataset(tmp_path / "csv")
    corrupt(root / "images" / "train-red-1.png")
    dataset = SkipUnreadable(CsvImageDataset(root / "train.csv"), max_fraction=0.2)
    image, label = dataset[1]
    assert label == 2 and image.size == (16, 16)  # red-2 in place of red-1
    assert dataset.source(1).endswith("train-red-1.png") and dataset.unreadable_indices() == [1]
    assert dataset.classes == ["blue", "green", "red"]  # the wrapped dataset's attributes stay reachable

    folder = make_image_folder(tmp_path / "folder", per_class=(2, 1))
    (folder / "train" / "red" / "0.png").write_bytes(b"not a png")
    wrapped = SkipUnreadable(image_folder(folder / "train"), policy="fail")
    with pytest.raises(ImageError, match=r"red/0.png"):
        [wrapped[i] for i in range(len(wrapped))]


def test_training_skips_counts_and_reports_unreadable_images(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(8, 4))
    corrupt(data / "train" / "green" / "3.png")
    corrupt(data / "val" / "red" / "0.png")
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run", epochs=1,
                           workers=1, max_bad_images=0.1)
    with Trainer(load_config((values, "test"))) as trainer:
        summary = trainer.fit()
    assert summary["unreadable_images"]["train"][0].endswith("green/3.png")
    assert summary["unreadable_images"]["eval"][0].endswith("red/0.png")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    row = metrics["history"][0]
    assert row["unreadable_train_images"] == 1 and row["unreadable_eval_images"] == 1
    assert metrics["final"]["samples"] == 12  # the evaluation still counts every index (one replaced)
    assert "unreadable images skipped so far: train 1, eval 1 (e.g. " in capsys.readouterr().out


def test_fail_fast_from_the_command_line_names_the_file_in_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    corrupt(data / "train" / "blue" / "1.png")
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run",
                                   epochs=1, workers=1, bad_images="fail", batch_size=12))
    assert main(["train", *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("biformer train: error: train split: image: cannot read ") and "blue/1.png" in error
    assert error.count("\n") == 1  # the worker's traceback is not shown


def test_too_many_unreadable_images_stop_the_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    for number in range(3):
        corrupt(data / "train" / "red" / f"{number}.png")
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run",
                                   epochs=1, workers=0, max_bad_images=0.1))
    assert main(["train", *flags]) == 2
    assert "more than max_bad_images 0.1 allows" in capsys.readouterr().err


def test_dense_datasets_skip_unreadable_images_and_still_collate(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for index in range(3):
        Image.fromarray(np.full((8, 12, 3), 40 * index, dtype=np.uint8)).save(images / f"{index}.png")
        Image.fromarray(np.zeros((8, 12), dtype=np.uint8), mode="L").save(masks / f"{index}.png")
    corrupt(images / "1.png")
    segmentation = SkipUnreadable(MaskFolderDataset(images, masks, num_classes=2), max_fraction=0.5)
    batch_images, batch_masks = segmentation_collate([segmentation[i] for i in range(3)])
    assert batch_images.shape == (3, 3, 8, 12) and batch_masks.shape == (3, 8, 12)
    assert torch.equal(batch_images[1], batch_images[2])  # item 1 replaced by item 2
    assert segmentation.source(1).startswith(str(images / "1.png"))

    coco = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": 12, "height": 8} for i in range(3)],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    detection = SkipUnreadable(CocoDetectionDataset(images, tmp_path / "instances.json"), max_fraction=0.5)
    batch = detection_collate([detection[i] for i in range(3)])
    assert [target["image_id"] for target in batch[1]] == [1, 3, 3]
    assert detection.source(1) == str(images / "1.png") and detection.unreadable_indices() == [1]
