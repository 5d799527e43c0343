"""A built-in detection/segmentation dataset with real pixels that runs offline: scenes of Fashion-MNIST crops.

Each scene is a canvas (a random dark colour gradient plus noise) on which 1-4 real 28 x 28 Fashion-MNIST
crops, scaled and tinted, are alpha-blended. An object's mask is the set of its pasted pixels brighter than
``mask_threshold`` that no later object covers; its box is the extent of that mask; the semantic map holds
class ``label + 1`` on the masks and 0 (background) elsewhere. Scene ``i`` depends only on ``(seed, i)`` and
the crops, so a dataset is deterministic and can be read in any order by any number of workers.

The crops come from any source (an array of images and labels); :func:`load_fashion_mnist` reads the real
data where ``biformer train`` finds it (the dataset search path, ``$BIFORMER_DATA_PATH``; by default the Debian
package ``dataset-fashion-mnist``'s idx files under ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..train.data import DATA_PATH_ENV, _idx_file, fashion_mnist_folders, read_idx  # one reader, one lookup

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "Scene",
    "SceneDataset",
    "compose_scene",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "BIFORMER_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type byte -> big-endian numpy dtype (the format of the MNIST files)
TASKS = ("detection", "segmentation")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 (N, 28, 28) and labels int64 (N,) of ``split`` ("train" or "test").

    ``root``: the folder with the split's two idx files (``.gz`` or not). None: ``$BIFORMER_FASHION_MNIST``
    if set, else the folders ``biformer train`` searches (:func:`biformer.train.data.fashion_mnist_folders`:
    ``DIR/fashion-mnist`` for each folder ``DIR`` of ``$BIFORMER_DATA_PATH``, by default
    ``/usr/share/datasets``, installed by ``apt-get install dataset-fashion-mnist``, then ``~/.cache/biformer``),
    each as is or in torchvision's layout (``FashionMNIST/raw``).

    Raises:
        FileNotFoundError: the files are not there; the message says how to install them.
        ValueError: unknown split, unreadable files, or images and labels that do not match.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = root or os.environ.get(FASHION_MNIST_ENV) or None
    folders = [Path(root).expanduser()] if root else fashion_mnist_folders()
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    places = [place for folder in folders for place in (folder, folder / "FashionMNIST" / "raw")]
    found = [(_idx_file(place, image_stem), _idx_file(place, label_stem)) for place in places]
    image_path, label_path = next(((i, lab) for i, lab in found if i and lab), (None, None))
    if image_path is None or label_path is None:
        where = ", ".join(str(folder) for folder in folders) or f"no folder (${DATA_PATH_ENV} is empty)"
        raise FileNotFoundError(
            f"Fashion-MNIST: {image_stem}.gz / {label_stem}.gz not found in {where}. Install the data with "
            f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu, offline idx files), or download the four "
            f"idx .gz files into DIR/fashion-mnist for a folder DIR of ${DATA_PATH_ENV}, or pass their folder "
            f"(root=..., --data-dir)"
        )
    root = image_path.parent
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST: images {images.shape} and labels {labels.shape} do not match in {root}")
    return images, labels.astype(np.int64)


@dataclass
class Scene:
    """One composed scene. ``image`` uint8 (H, W, 3); ``boxes`` float32 (K, 4) xyxy in pixels (exclusive
    right/bottom edges); ``labels`` int64 (K,) in 1..num_classes; ``masks`` bool (K, H, W); ``semantic``
    int64 (H, W) with 0 for background."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    semantic: np.ndarray


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dark two-colour linear gradient in a random direction, float (H, W, 3) in [0, 0.45]."""
    start, end = rng.uniform(0.0, 0.45, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.cos(angle) * cols / max(width - 1, 1) + np.sin(angle) * rows / max(height - 1, 1)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # (H, W) in [0, 1]
    return start + (end - start) * ramp[..., None]


def _scaled_crop(crop: np.ndarray, side: int) -> np.ndarray:
    """A uint8 (28, 28) crop resized to (side, side), bilinear, as float alpha in [0, 1]."""
    resized = Image.fromarray(crop).resize((side, side), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def compose_scene(
    crops: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    image_size: tuple[int, int] = (128, 128),
    objects: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (1.0, 2.0),
    max_occlusion: float = 0.3,
    mask_threshold: float = 0.1,
    min_pixels: int = 20,
    noise: float = 0.02,
) -> Scene:
    """Compose one scene from ``crops`` (uint8 (M, h, w)) and their ``labels`` (int (M,), class ids from 0).

    Args:
        rng: the source of every random choice (the scene is a function of the rng state).
        image_size: (H, W) of the canvas.
        objects: inclusive range of how many objects to try to place.
        scale: range of the crop's scale factor (a 28 px crop becomes 28 to 56 px with the default).
        max_occlusion: a placement is retried (up to 10 times, then the object is skipped) if it would
            cover more than this fraction of an earlier object's visible pixels.
        mask_threshold: alpha above which a pasted pixel belongs to the object's mask.
        min_pixels: crops whose mask would have fewer pixels are skipped.
        noise: standard deviation of the Gaussian pixel noise added last (in [0, 1] units).
    """
    height, width = image_size
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int64)  # index of the object visible at each pixel
    placed_labels = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        index = int(rng.integers(len(crops)))
        side = min(int(round(crops.shape[1] * rng.uniform(*scale))), height, width)
        alpha = _scaled_crop(crops[index], side)  # (side, side)
        mask = alpha > mask_threshold
        colour = rng.uniform(0.55, 1.0, size=3)
        if mask.sum() < min_pixels:
            continue
        for _attempt in range(10):
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            window = owner[top : top + side, left : left + side]
            covered = np.bincount(window[mask & (window >= 0)], minlength=len(placed_labels))
            visible = np.bincount(owner[owner >= 0], minlength=len(placed_labels))
            if np.all(covered <= max_occlusion * np.maximum(visible, 1)):
                break
        else:
            continue
        region = canvas[top : top + side, left : left + side]
        region[:] = alpha[..., None] * colour + (1 - alpha[..., None]) * region
        window[mask] = len(placed_labels)
        placed_labels.append(int(labels[index]) + 1)
    canvas = canvas + rng.normal(0.0, noise, size=canvas.shape)
    image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    masks = owner[None] == np.arange(len(placed_labels))[:, None, None]  # (K, H, W)
    boxes = np.array([_mask_box(m) for m in masks], dtype=np.float32).reshape(-1, 4)
    class_ids = np.array(placed_labels, dtype=np.int64)
    semantic = np.where(owner >= 0, np.concatenate([[0], class_ids])[owner + 1], 0)
    return Scene(image=image, boxes=boxes, labels=class_ids, masks=masks, semantic=semantic)


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """xyxy extent of a boolean (H, W) mask, right/bottom exclusive."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class SceneDataset(Dataset):
    """``num_scenes`` scenes composed from ``crops``; scene ``i`` is drawn from ``np.random.default_rng((seed, i))``.

    Args:
        crops: uint8 (M, h, w) grey crops (e.g. Fashion-MNIST images); labels: int (M,) class ids from 0.
        num_scenes: dataset length.
        task: ``"detection"``: items are (image, target) with image float (3, H, W) in [0, 1] and target a dict
            of ``boxes`` float (K, 4) xyxy, ``labels`` int64 (K,) in 1..num_classes, ``masks`` uint8 (K, H, W)
            (torchvision's detection format); ``"segmentation"``: items are (image, mask int64 (H, W)),
            0 = background.
        seed: scene seed.
        image_size: int or (H, W).
        **compose_options: passed to :func:`compose_scene` (``objects``, ``scale`` ...).

    ``num_classes`` counts the background: 1 + the number of crop classes.
    """

    def __init__(
        self, crops: np.ndarray, labels: np.ndarray, num_scenes: int, task: str = "detection", seed: int = 0,
        image_size: int | tuple[int, int] = 128, **compose_options: object,
    ) -> None:
        crops, labels = np.asarray(crops), np.asarray(labels)
        if crops.ndim != 3 or crops.dtype != np.uint8 or len(crops) == 0:
            raise ValueError(f"crops: expected a non-empty uint8 array (M, h, w), got {crops.dtype} {crops.shape}")
        if labels.shape != (len(crops),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"labels: expected {len(crops)} integer class ids >= 0, got {labels.dtype} {labels.shape}")
        if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 1:
            raise ValueError(f"num_scenes: expected an integer >= 1, got {num_scenes!r}")
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < crops.shape[1] for s in size):
            raise ValueError(f"image_size: expected an int or (H, W) of at least the crop size {crops.shape[1]}, "
                             f"got {image_size!r}")
        self.crops, self.labels, self.num_scenes = crops, labels, num_scenes
        self.task, self.seed, self.image_size = task, seed, size
        self.compose_options = compose_options
        self.num_classes = int(labels.max()) + 2
        self.class_names: tuple[str, ...] = ("background", *(f"class {i}" for i in range(self.num_classes - 1)))

    @classmethod
    def from_fashion_mnist(
        cls, split: str = "train", num_scenes: int = 2000, root: str | os.PathLike | None = None,
        **kwargs: object,
    ) -> SceneDataset:
        """Scenes of real Fashion-MNIST crops of ``split`` (train and test crops are disjoint: use "test" for
        validation). Raises ``FileNotFoundError`` with install instructions when the data is missing."""
        crops, labels = load_fashion_mnist(split, root)
        dataset = cls(crops, labels, num_scenes, **kwargs)
        dataset.class_names = ("background", *FASHION_MNIST_CLASSES)
        return dataset

    def __len__(self) -> int:
        return self.num_scenes

    def scene(self, index: int) -> Scene:
        """The composed scene ``index`` (numpy arrays)."""
        if not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range for {self.num_scenes} scenes")
        rng = np.random.default_rng((self.seed, index % self.num_scenes))
        return compose_scene(self.crops, self.labels, rng, self.image_size, **self.compose_options)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | torch.Tensor]:
        scene = self.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        if self.task == "segmentation":
            return image, torch.from_numpy(scene.semantic)
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.labels),
            "masks": torch.from_numpy(scene.masks.astype(np.uint8)),
        }
        return image, target
