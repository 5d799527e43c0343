"""Tiny generated datasets and a micro model configuration for the training tests (no real data needed).

Images are easy to tell apart (each class has its own bright band or colour), so a micro model learns
them in a few steps.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

# A micro biformer_nano: about 10k parameters, one block per stage, one region per side at 16 px.
MICRO_MODEL_KWARGS = {"depth": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "head_dim": 8, "n_win": 1,
                      "topks": [1, 1, 1, -2]}
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))


def micro_options(**overrides: object) -> dict:
    """Configuration values for a quick run on 16 px images (one thread, no progress bars)."""
    values = dict(model="biformer_nano", model_kwargs=dict(MICRO_MODEL_KWARGS), input_size=16, epochs=2,
                  batch_size=8, threads=1, progress=False, warmup_epochs=0.0, lr=1e-2, seed=0)
    values.update(overrides)
    return values


def as_flags(values: dict) -> list[str]:
    """``{"batch_size": 8}`` -> ``["--batch-size", "8"]`` (lists and dicts as JSON, booleans as switches)."""
    import json

    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, dict)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the idx format, gzip-compressed: an independent writer for the reader."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, train: int = 48, test: int = 24, seed: int = 0) -> Path:
    """A Fashion-MNIST lookalike: the four idx .gz files, 28 x 28 images, labels 0-9, class = band row."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, (count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label + 3 : 2 * label + 7, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _picture(class_index: int, rng: np.random.Generator, size: int = 16) -> Image.Image:
    pixels = rng.integers(0, 60, (size, size, 3)) + np.array(COLOURS[class_index]) // 2
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def make_image_folder(root: Path, per_class: tuple[int, int] = (8, 4), seed: int = 0) -> Path:
    """``root/train/CLASS/*.png`` and ``root/val/CLASS/*.png`` for classes red, green, blue."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for class_index, name in enumerate(("blue", "green", "red")[::-1]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                _picture(class_index, rng).save(folder / f"{number}.png")
    return root


def make_csv_dataset(root: Path, per_class: tuple[int, int] = (6, 3), seed: int = 0) -> Path:
    """``root/images/*.png`` listed in ``root/train.csv`` and ``root/val.csv`` (with a header row)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val"), per_class):
        lines = ["path,label"]
        for class_index, name in enumerate(("red", "green", "blue")):
            for number in range(count):
                relative = f"images/{split}-{name}-{number}.png"
                _picture(class_index, rng).save(root / relative)
                lines.append(f"{relative},{name}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def corrupt(path: Path) -> None:
    """Keep the first bytes of a PNG (a truncated download)."""
    path.write_bytes(path.read_bytes()[:40])
