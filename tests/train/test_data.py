"""Datasets: the idx reader against an independent writer, Fashion-MNIST lookup, ImageFolder and CSV lists."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biformer.dense import load_fashion_mnist
from biformer.train import data as data_module
from biformer.train.data import (
    CsvImageDataset,
    DataError,
    FashionMNIST,
    collate_classification,
    data_search_path,
    find_fashion_mnist,
    image_folder,
    read_idx,
)
from train.synthetic import make_csv_dataset, make_fashion_mnist, make_image_folder, write_idx


def test_read_idx_matches_the_written_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    # uncompressed files too
    (tmp_path / "b").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), array)


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 28, 28), np.uint8))
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"header says shape \(4, 28, 28\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match="bad header"):
        read_idx(tmp_path / "png")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "broken.gz")


def test_fashion_mnist_lookalike_loads(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", train=20, test=10)
    assert find_fashion_mnist(root, download=False) == root
    train = FashionMNIST(root, "train")
    image, label = train[3]
    assert len(train) == 20 and label == 3
    assert isinstance(image, Image.Image) and image.size == (28, 28) and image.mode == "L"
    assert np.asarray(image)[2 * 3 + 4, 10] == 230  # the class band drawn by the generator
    assert FashionMNIST(root, "test", mode="RGB")[0][0].mode == "RGB"
    with pytest.raises(DataError, match="split: expected 'train' or 'test'"):
        FashionMNIST(root, "val")


def test_fashion_mnist_found_in_torchvision_layout(tmp_path):
    raw = make_fashion_mnist(tmp_path / "cache" / "FashionMNIST" / "raw", train=10, test=10)
    assert find_fashion_mnist(tmp_path / "cache", download=False) == raw


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as error:
        find_fashion_mnist(tmp_path / "nowhere", download=False)
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message
    assert str(tmp_path / "nowhere") in message


def test_fashion_mnist_failed_download_is_reported(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError, match="Downloading it with torchvision .* failed .*Error downloading"):
        find_fashion_mnist(tmp_path / "empty", download=True)


def test_fashion_mnist_labels_out_of_range(tmp_path):
    root = make_fashion_mnist(tmp_path, train=10, test=10)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(10, 12))
    with pytest.raises(DataError, match="labels outside 0..9"):
        FashionMNIST(root, "train")


def test_fashion_mnist_default_places(monkeypatch, tmp_path):
    """Without $BIFORMER_DATA_PATH: /usr/share/datasets (the Debian package), then ~/.cache/biformer."""
    assert data_module.DEFAULT_DATA_DIRS == (Path("/usr/share/datasets"), Path("~/.cache/biformer"))
    share, home = tmp_path / "usr-share-datasets", tmp_path / "home"
    monkeypatch.delenv("BIFORMER_DATA_PATH")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIRS", (share, Path("~/.cache/biformer")))
    assert data_search_path() == [share, home / ".cache" / "biformer"]
    cached = make_fashion_mnist(home / ".cache" / "biformer" / "fashion-mnist", train=10, test=10)
    assert find_fashion_mnist(None, download=False) == cached
    packaged = make_fashion_mnist(share / "fashion-mnist", train=10, test=10)
    assert find_fashion_mnist(None, download=False) == packaged  # the first folder of the search path wins
    (packaged / "train-images-idx3-ubyte.gz").rename(tmp_path / "moved")  # incomplete: the next folder is used
    assert find_fashion_mnist(None, download=False) == cached
    (cached / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="the default search path; set BIFORMER_DATA_PATH to search other folders"):
        find_fashion_mnist(None, download=False)


def test_data_path_replaces_the_default_folders(monkeypatch, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    found = make_fashion_mnist(second / "fashion-mnist", train=10, test=10)
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIRS", (tmp_path / "default",))
    make_fashion_mnist(tmp_path / "default" / "fashion-mnist", train=10, test=10)
    monkeypatch.setenv("BIFORMER_DATA_PATH", os.pathsep.join([str(first), "", str(second)]))
    assert data_search_path() == [first, second]  # empty entries are skipped
    assert find_fashion_mnist(None, download=False) == found
    loaded, labels = load_fashion_mnist("test")  # the scenes' crops: the same lookup
    assert loaded.shape == (10, 28, 28) and labels.tolist() == list(range(10))
    monkeypatch.setenv("BIFORMER_DATA_PATH", str(first))  # the defaults are not searched
    with pytest.raises(DataError, match=f"not found in {first / 'fashion-mnist'} \\(BIFORMER_DATA_PATH="):
        find_fashion_mnist(None, download=False)
    with pytest.raises(FileNotFoundError, match="BIFORMER_DATA_PATH"):
        load_fashion_mnist("train")


def test_download_goes_to_the_last_folder_of_the_search_path(monkeypatch, tmp_path):
    import torchvision.datasets

    roots = []

    class FakeTorchvision:  # writes the files where torchvision's download would
        def __init__(self, root, train, download):
            roots.append(root)
            make_fashion_mnist(Path(root) / "FashionMNIST" / "raw", train=10, test=10)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeTorchvision)
    monkeypatch.setenv("BIFORMER_DATA_PATH", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    found = find_fashion_mnist(None, download=True)
    assert found == tmp_path / "b" / "fashion-mnist" / "FashionMNIST" / "raw"
    assert roots == [str(tmp_path / "b" / "fashion-mnist")] * 2
    assert find_fashion_mnist(None, download=False) == found  # found there the next time


def test_an_empty_search_path_searches_and_downloads_nothing(monkeypatch, tmp_path):
    import torchvision.datasets

    class MustNotDownload:
        def __init__(self, *args, **kwargs):
            raise AssertionError("downloaded although the search path is empty")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", MustNotDownload)
    monkeypatch.setenv("BIFORMER_DATA_PATH", "")
    assert data_search_path() == []
    with pytest.raises(DataError, match="not found in no folder .*empty search path.* Nothing was downloaded"):
        find_fashion_mnist(None, download=True)


def test_the_session_lookalike_is_found_on_the_search_path(fashion_mnist_on_search_path):
    """The suite's own Fashion-MNIST (tests/conftest.py): the real file names and format, 10 balanced classes."""
    assert find_fashion_mnist(None, download=False) == fashion_mnist_on_search_path
    folder = fashion_mnist_on_search_path
    train, test = FashionMNIST(folder, "train"), FashionMNIST(folder, "test")
    assert (len(train), len(test)) == (300, 100) and np.bincount(train.labels).tolist() == [30] * 10
    assert train.images.shape == (300, 28, 28) and train.images.dtype == np.uint8
    # the classes differ: the shape (pixels above 100) of a test image is nearest to a training shape of its class
    shapes = [(split.images > 100).reshape(len(split), -1).astype(np.float32) for split in (train, test)]
    distances = ((shapes[1][:, None] - shapes[0][None]) ** 2).sum(axis=-1)  # (100 test, 300 train)
    assert (train.labels[distances.argmin(axis=1)] == test.labels).mean() > 0.8  # chance: 0.1


def test_image_folder_and_shared_class_order(tmp_path):
    root = make_image_folder(tmp_path)
    train = image_folder(root / "train")
    assert train.classes == ["blue", "green", "red"] and len(train) == 24
    image, label = train[0]
    assert image.mode == "RGB" and label == 0
    # a validation folder missing a class keeps the training indices
    (root / "val" / "green").rename(tmp_path / "moved")
    val = image_folder(root / "val", classes=train.classes)
    assert sorted(set(val.targets)) == [0, 2]
    (root / "val" / "purple").mkdir()
    Image.new("RGB", (4, 4)).save(root / "val" / "purple" / "x.png")
    with pytest.raises(DataError, match=r"class folders \['purple'\] are not among the training classes"):
        image_folder(root / "val", classes=train.classes)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="CLASS_NAME/IMAGE"):
        image_folder(tmp_path / "empty")


def test_csv_dataset(tmp_path):
    root = make_csv_dataset(tmp_path)
    train = CsvImageDataset(root / "train.csv")
    assert train.classes == ["blue", "green", "red"] and len(train) == 18
    image, label = train[0]
    assert image.mode == "RGB" and train.classes[label] == "red"
    gray = CsvImageDataset(root / "val.csv", mode="L", classes=train.classes)
    assert gray[0][0].mode == "L"


def test_csv_without_header_and_numeric_labels(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("a.png,10\na.png,9\n\na.png,2\n")
    dataset = CsvImageDataset(tmp_path / "list.csv")
    assert dataset.classes == ["2", "9", "10"]  # numeric order
    assert [label for _, label in dataset.samples] == [2, 1, 0]


@pytest.mark.parametrize(
    "text, message",
    [("path,label\n", "no rows"), ("a.png\n", "row 1: expected 'path,label'"),
     ("path,label\na.png,cat,extra\n", "row 2: expected 'path,label'"), ("a.png,\n", "row 1")],
)
def test_csv_bad_rows(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        CsvImageDataset(tmp_path / "bad.csv")


def test_csv_unknown_label_and_missing_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "val.csv").write_text("a.png,zebra\n")
    with pytest.raises(DataError, match=r"labels \['zebra'\] are not among the training classes"):
        CsvImageDataset(tmp_path / "val.csv", classes=["cat", "dog"])
    with pytest.raises(DataError, match="no such file"):
        CsvImageDataset(tmp_path / "absent.csv")
    (tmp_path / "missing.csv").write_text("gone.png,cat\n")
    with pytest.raises(ValueError, match="no such file: .*gone.png"):
        CsvImageDataset(tmp_path / "missing.csv")[0]


def test_collate_shapes():
    images, labels = collate_classification([(torch.zeros(1, 8, 8), 2), (torch.ones(1, 8, 8), 0)])
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [2, 0] and labels.dtype == torch.int64


def test_datasets_pickle_for_spawned_workers(tmp_path):
    import pickle

    folder = image_folder(make_image_folder(tmp_path / "folder") / "train")
    table = CsvImageDataset(make_csv_dataset(tmp_path / "csv") / "train.csv")
    fashion = FashionMNIST(make_fashion_mnist(tmp_path / "fm", train=10, test=10), "train")
    for dataset in (folder, table, fashion):
        copy = pickle.loads(pickle.dumps(dataset))
        assert np.array_equal(np.asarray(copy[1][0]), np.asarray(dataset[1][0])) and copy[1][1] == dataset[1][1]
