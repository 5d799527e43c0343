"""The built-in scenes: determinism, consistency of masks/boxes/semantic maps, the idx reader, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from dense_helpers import generated_crops

from biformer.dense import SceneDataset, load_fashion_mnist, read_idx


def write_idx(path, array: np.ndarray, type_byte: int = 0x08) -> None:
    """An idx file written field by field from the format's definition (magic, big-endian dims, data)."""
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_same_seed_same_scenes_in_any_order():
    crops, labels = generated_crops()
    first = SceneDataset(crops, labels, 6, task="detection", seed=3, image_size=64)
    second = SceneDataset(crops, labels, 6, task="detection", seed=3, image_size=64)
    for index in (5, 0, 3):  # a different access order
        image_a, target_a = first[index]
        image_b, target_b = second[index]
        assert torch.equal(image_a, image_b)
        assert all(torch.equal(target_a[k], target_b[k]) for k in ("boxes", "labels", "masks"))
    other_seed = SceneDataset(crops, labels, 6, task="detection", seed=4, image_size=64)
    assert not torch.equal(first[0][0], other_seed[0][0])
    assert not torch.equal(first[0][0], first[1][0])


def test_masks_boxes_labels_and_semantic_map_agree():
    crops, labels = generated_crops(classes=3)
    dataset = SceneDataset(crops, labels, 20, seed=1, image_size=(64, 80), objects=(2, 4))
    counts = []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        assert scene.image.shape == (64, 80, 3) and scene.image.dtype == np.uint8
        assert scene.masks.sum(axis=0).max() <= 1  # one visible object per pixel
        for mask, box, label in zip(scene.masks, scene.boxes, scene.labels):
            rows, cols = np.nonzero(mask)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert 1 <= label <= 3 and (scene.semantic[mask] == label).all()
        assert (scene.semantic[~scene.masks.any(axis=0)] == 0).all()
        counts.append(len(scene.labels))
    assert min(counts) >= 1 and max(counts) >= 3


def test_objects_are_the_pasted_pixels():
    """A single white crop pasted with colour c: inside its mask the image is close to c (alpha near 1)."""
    crop = np.zeros((1, 28, 28), dtype=np.uint8)
    crop[0, 4:24, 6:20] = 255
    scene = SceneDataset(crop, np.array([2]), 1, image_size=40, objects=(1, 1), scale=(1.0, 1.0), noise=0.0).scene(0)
    assert scene.masks.shape == (1, 40, 40) and scene.masks[0].sum() == 20 * 14
    assert scene.labels.tolist() == [3]
    box = scene.boxes[0]
    assert box[2] - box[0] == 14 and box[3] - box[1] == 20
    inside = scene.image[scene.masks[0]].astype(float)
    assert inside.min() >= 0.55 * 255 - 1  # the tint colours are drawn in [0.55, 1]


def test_segmentation_items():
    crops, labels = generated_crops()
    image, mask = SceneDataset(crops, labels, 2, task="segmentation", image_size=48)[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.shape == (48, 48) and mask.dtype == torch.int64 and mask.max() <= 3


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_reader_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5)).astype(np.uint8)
    write_idx(tmp_path / f"images{suffix}", images)
    assert np.array_equal(read_idx(tmp_path / f"images{suffix}"), images)
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
    write_idx(tmp_path / "values", values, type_byte=0x0C)
    assert np.array_equal(read_idx(tmp_path / "values"), values)


def test_idx_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent.gz")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="idx header"):
        read_idx(tmp_path / "text")
    write_idx(tmp_path / "full", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "full").read_bytes()[:-1])
    with pytest.raises(ValueError, match="17 bytes, expected 18"):
        read_idx(tmp_path / "cut")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="decompress"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_loader_reads_a_folder_of_idx_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 4], dtype=np.uint8))
    loaded, labels = load_fashion_mnist("test", root=tmp_path)
    assert np.array_equal(loaded, images) and labels.tolist() == [0, 1, 2, 9, 4] and labels.dtype == np.int64
    dataset = SceneDataset.from_fashion_mnist("test", 3, root=tmp_path, image_size=40)
    assert dataset.num_classes == 11 and dataset.class_names[1] == "T-shirt/top" and len(dataset) == 3


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(crops=np.zeros((2, 28, 28), dtype=np.float32)), "crops"),
        (dict(labels=np.array([0, -1] * 20)), "labels"),
        (dict(labels=np.zeros(3, dtype=int)), "labels"),
        (dict(num_scenes=0), "num_scenes"),
        (dict(task="panoptic"), "task"),
        (dict(image_size=20), "image_size"),
        (dict(image_size=(64,)), "image_size"),
    ],
)
def test_bad_arguments(kwargs, message):
    crops, labels = generated_crops()
    arguments = {"crops": crops, "labels": labels, "num_scenes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        SceneDataset(**arguments)


def test_index_out_of_range():
    crops, labels = generated_crops()
    with pytest.raises(IndexError, match="out of range"):
        SceneDataset(crops, labels, 2)[2]
