"""Image classification data: Fashion-MNIST (idx files), ImageFolder trees and CSV lists of ``path,label``.

Every dataset yields ``(image, label)`` with ``image`` a PIL image in the requested mode (``"L"`` or
``"RGB"``) before the transform, so timm's transforms (random-resized crop, flip, RandAugment, random
erasing) apply to all of them.

:class:`SkipUnreadable` wraps any dataset (these, and the detection/segmentation ones) so that an
unreadable or corrupted image is skipped and counted instead of stopping a run hours in.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import ImageError, open_image
from .errors import DataError  # noqa: F401  (raised here; also importable from this module, as before)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "BAD_IMAGE_POLICIES",
    "CsvImageDataset",
    "DataError",
    "FashionMNIST",
    "DATA_PATH_ENV",
    "DEFAULT_DATA_DIRS",
    "SkipUnreadable",
    "data_search_path",
    "fashion_mnist_folders",
    "find_fashion_mnist",
    "image_folder",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# The dataset search path: $BIFORMER_DATA_PATH (folders separated by os.pathsep) when set, else where the
# Debian/Ubuntu dataset packages (``dataset-fashion-mnist``) install their data, then our download cache.
DATA_PATH_ENV = "BIFORMER_DATA_PATH"
DEFAULT_DATA_DIRS = (Path("/usr/share/datasets"), Path("~/.cache/biformer"))
FASHION_MNIST_FOLDER = "fashion-mnist"  # a dataset's folder name inside each search-path folder
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BAD_IMAGE_POLICIES = ("skip", "fail")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip-compressed when the name ends in ``.gz``).

    Layout: two zero bytes, a dtype code, the number of dimensions D, D big-endian uint32 sizes, then the
    data in C order.

    Raises:
        FileNotFoundError: no such file.
        DataError: not an idx file, or the data is shorter or longer than the header says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file: no such file: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise DataError(f"idx file {path}: cannot read (cannot decompress: {type(error).__name__}: {error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"idx file {path}: bad header, it does not start with an idx header "
            f"(expected 0x00 0x00 DTYPE NDIM, got {raw[:4].hex()})"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < header or len(raw) != expected:
        raise DataError(
            f"idx file {path}: header says shape {shape}; the file has {len(raw)} bytes, expected {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # native byte order, so torch.from_numpy accepts it


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(_idx_file(folder, stem) for pair in _IDX_FILES.values() for stem in pair)


def data_search_path() -> list[Path]:
    """The folders searched for datasets (Fashion-MNIST, the built-in scenes' crops), in order.

    ``$BIFORMER_DATA_PATH`` when it is set: folders separated by ``os.pathsep`` (``:`` on Linux and macOS,
    ``;`` on Windows), ``~`` expanded, empty entries skipped; it replaces the defaults, so an empty value
    searches nowhere. Unset: ``/usr/share/datasets`` (the Debian/Ubuntu dataset packages) then
    ``~/.cache/biformer`` (where ``biformer train`` downloads what it does not find). A dataset is looked
    up in its own folder inside each of them, e.g. ``DIR/fashion-mnist``.
    """
    value = os.environ.get(DATA_PATH_ENV)
    folders = DEFAULT_DATA_DIRS if value is None else [entry for entry in value.split(os.pathsep) if entry.strip()]
    return [Path(folder).expanduser() for folder in folders]


def _describe_search_path() -> str:
    value = os.environ.get(DATA_PATH_ENV)
    if value is None:
        return f"the default search path; set {DATA_PATH_ENV} to search other folders"
    return f"{DATA_PATH_ENV}={value!r}" + ("" if value.strip() else ", an empty search path")


def fashion_mnist_folders(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for: ``data_dir`` if given, else ``DIR/fashion-mnist`` for every folder
    ``DIR`` of :func:`data_search_path`. Each is tried as is and in torchvision's layout
    (``FOLDER/FashionMNIST/raw``)."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    return [folder / FASHION_MNIST_FOLDER for folder in data_search_path()]


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST idx files.

    Looks in ``data_dir`` if given, else in ``DIR/fashion-mnist`` for each folder of the dataset search path
    (:func:`data_search_path`: ``$BIFORMER_DATA_PATH``, by default /usr/share/datasets, where the
    Debian/Ubuntu package ``dataset-fashion-mnist`` installs it, then ~/.cache/biformer); each folder as is
    or in torchvision's layout (``FashionMNIST/raw``). If not found and ``download``, fetches it with
    torchvision into the last of those folders (by default ~/.cache/biformer/fashion-mnist); an empty search
    path downloads nothing.

    Raises:
        DataError: not found (and not downloadable); the message says how to get it.
    """
    candidates = fashion_mnist_folders(data_dir)
    for folder in candidates:
        for place in (folder, folder / "FashionMNIST" / "raw"):
            if _has_fashion_mnist(place):
                return place
    failure = " Nothing was downloaded: the search path is empty." if download and not candidates else ""
    if download and candidates:
        target = candidates[-1]
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            TorchvisionFashionMNIST(str(target), train=True, download=True)
            TorchvisionFashionMNIST(str(target), train=False, download=True)
        except Exception as error:  # noqa: BLE001 - any download failure leads to the same advice
            failure = f" Downloading it with torchvision into {target} failed ({type(error).__name__}: {error})."
        else:
            if _has_fashion_mnist(target / "FashionMNIST" / "raw"):
                return target / "FashionMNIST" / "raw"
    places = ", ".join(str(c) for c in candidates) if candidates else "no folder"
    searched = "" if data_dir else f" ({_describe_search_path()})"
    raise DataError(
        f"Fashion-MNIST not found in {places}{searched}.{failure} Get it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or run with network access and "
        "--download (torchvision fetches it), or pass --data-dir DIR with the four idx files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz), or put them in a folder fashion-mnist under a folder of {DATA_PATH_ENV}."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx files: 28 x 28 grayscale images, 10 classes (60k train, 10k test).

    Args:
        folder: the folder with the idx files (see :func:`find_fashion_mnist`).
        split: ``"train"`` or ``"test"``.
        transform: applied to the PIL image (mode ``mode``).
        mode: PIL mode of the images before the transform (``"L"``, or ``"RGB"`` for 3-channel models).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, folder: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 mode: str = "L") -> None:
        if split not in _IDX_FILES:
            raise DataError(f"fashion-mnist split: expected 'train' or 'test', got {split!r}")
        folder = Path(folder)
        image_stem, label_stem = _IDX_FILES[split]
        image_file, label_file = _idx_file(folder, image_stem), _idx_file(folder, label_stem)
        if image_file is None or label_file is None:
            raise DataError(f"fashion-mnist: {image_stem}(.gz) and {label_stem}(.gz) not found in {folder}")
        self.images = read_idx(image_file)  # (N, 28, 28) uint8
        self.labels = read_idx(label_file).astype(np.int64)  # (N,)
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise DataError(
                f"fashion-mnist {split}: expected images (N, H, W) and labels (N,), got {self.images.shape} "
                f"and {self.labels.shape}"
            )
        if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise DataError(f"fashion-mnist {split}: labels outside 0..{len(self.classes) - 1} in {label_file}")
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = Image.fromarray(self.images[index], mode="L").convert(self.mode)
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def image_folder(root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 classes: Sequence[str] | None = None) -> Dataset:
    """torchvision's ImageFolder (``root/CLASS/image.png``) with our safe image opening.

    Args:
        classes: expected class names, in label order (the training split's); every class folder of
            ``root`` must be one of them. None: the sorted folder names.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder: no such folder: {root} (expected {root}/CLASS_NAME/IMAGE files)")
    try:
        # a partial, not a lambda: data-loading workers started with "spawn" (macOS, Windows) pickle it
        dataset = ImageFolder(str(root), transform=transform, loader=functools.partial(open_image, mode=mode))
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"imagefolder {root}: {error} (expected {root}/CLASS_NAME/IMAGE files)") from error
    if classes is not None:
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise DataError(f"imagefolder {root}: class folders {unknown} are not among the training classes")
        index = {name: i for i, name in enumerate(classes)}
        dataset.samples = [(path, index[dataset.classes[label]]) for path, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
        dataset.classes, dataset.class_to_idx = list(classes), index
    return dataset


class CsvImageDataset(Dataset):
    """Images listed in a CSV file of ``path,label`` rows (an optional ``path,label`` header row).

    Relative paths are relative to the CSV file's folder. Labels are class names (any text); the label
    index is the name's position in ``classes`` (default: the sorted distinct labels of this file, in
    numeric order when all are integers).
    """

    def __init__(self, csv_path: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 classes: Sequence[str] | None = None) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"csv: no such file: {csv_path} (expected rows of path,label)")
        rows = self._read_rows(csv_path)
        names = sorted({label for _, label in rows}, key=_label_sort_key(rows))
        self.classes = list(classes) if classes is not None else names
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"csv {csv_path}: labels {unknown[:10]} are not among the training classes")
        self.samples = [(path, index[label]) for path, label in rows]
        self.transform = transform
        self.mode = mode

    @staticmethod
    def _read_rows(csv_path: Path) -> list[tuple[Path, str]]:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" has a BOM
            lines = list(csv.reader(handle))
        has_header = bool(lines) and [cell.strip().lower() for cell in lines[0]] == ["path", "label"]
        rows = []
        for number, cells in enumerate(lines, start=1):  # numbers are the file's row numbers
            if (number == 1 and has_header) or not cells or all(not cell.strip() for cell in cells):
                continue
            if len(cells) != 2 or not cells[0].strip() or not cells[1].strip():
                raise DataError(f"csv {csv_path}, row {number}: expected 'path,label', got {cells!r}")
            path = Path(cells[0].strip())
            rows.append((path if path.is_absolute() else csv_path.parent / path, cells[1].strip()))
        if not rows:
            raise DataError(f"csv {csv_path}: no rows (expected lines of path,label)")
        return rows

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str:
        """The image file of item ``index`` (for messages)."""
        return str(self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, label = self.samples[index]
        image = open_image(path, self.mode)
        return (self.transform(image) if self.transform else image), label


def _label_sort_key(rows: list[tuple[Path, str]]) -> Callable[[str], object]:
    if all(label.lstrip("-").isdigit() for _, label in rows):
        return int
    return str


def collate_classification(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image (C, H, W), label)] -> images (N, C, H, W) float, labels (N,) int64."""
    images = torch.stack([image for image, _ in batch])  # (N, C, H, W)
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)  # (N,)
    return images, labels


def _item_source(dataset: Dataset, index: int) -> str:
    """What item ``index`` of ``dataset`` is read from, for messages: the dataset's ``source(index)``, the
    path in torchvision's ``samples`` list (ImageFolder), else ``item INDEX``."""
    if callable(getattr(dataset, "source", None)):
        return dataset.source(index)
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and index < len(samples) and isinstance(samples[index], tuple):
        return str(samples[index][0])
    return f"item {index}"


class SkipUnreadable(Dataset):
    """A dataset whose unreadable items (:class:`~biformer.images.ImageError`: missing, truncated, corrupted,
    over the pixel limit) are skipped and counted, or stop the run at once naming the file.

    With ``policy="skip"`` an unreadable item ``i`` is replaced by the next readable item ``i + 1, i + 2, ...``
    (wrapping around): every batch keeps its size and every process its number of samples (a sampler's
    indices are unchanged), and the replacement depends only on which files are unreadable, so runs stay
    reproducible. Unreadable items are remembered in a shared-memory table, so the findings of data-loading
    worker processes reach the training process (:meth:`unreadable_indices`) and a bad file is tried only
    once per process tree. When more than ``max_fraction`` of the items are found unreadable the dataset
    raises :class:`DataError` rather than train on what is left.

    Args:
        dataset: any map-style dataset whose ``__getitem__`` raises ``ImageError`` for a bad file.
        policy: ``"skip"`` or ``"fail"`` (re-raise the ``ImageError``, which names the file).
        max_fraction: the fraction of unreadable items (in [0, 1]) that stops the run with ``"skip"``.
        split: the split's name, for messages (``"train"``, ``"eval"``).
    """

    def __init__(self, dataset: Dataset, policy: str = "skip", max_fraction: float = 0.01,
                 split: str = "train") -> None:
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images: expected one of {BAD_IMAGE_POLICIES}, got {policy!r}")
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_images: expected a fraction in [0, 1], got {max_fraction}")
        self.dataset, self.policy, self.max_fraction, self.split = dataset, policy, max_fraction, split
        self.unreadable = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # (N,) True: unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> object:
        """Attributes of the wrapped dataset (``classes``, ``samples`` ...) stay reachable."""
        if name == "dataset":  # not set yet (unpickling): avoid endless recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> object:
        size = len(self.dataset)
        for offset in range(size):
            candidate = (index + offset) % size
            if self.unreadable[candidate]:
                continue
            try:
                return self.dataset[candidate]
            except ImageError as error:
                if self.policy == "fail":
                    raise ImageError(f"{self.split} split: {error} (bad_images: fail; set bad_images: skip to skip "
                                     "unreadable images)") from error
                self.unreadable[candidate] = True
                self._check_limit(error)
        raise DataError(f"{self.split} split: none of its {size} images is readable")

    def _check_limit(self, error: ImageError) -> None:
        count, size = int(self.unreadable.sum()), len(self.dataset)
        if count > self.max_fraction * size:
            raise DataError(
                f"{self.split} split: {count} of {size} images are unreadable, more than max_bad_images "
                f"{self.max_fraction:g} allows; the last one: {error}"
            )

    def unreadable_indices(self) -> list[int]:
        """Indices of the items found unreadable so far (by this process and its data-loading workers)."""
        return self.unreadable.nonzero().flatten().tolist()

    def source(self, index: int) -> str:
        """What item ``index`` is read from (a file path when the wrapped dataset says)."""
        return _item_source(self.dataset, index)
