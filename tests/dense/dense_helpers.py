"""Small models, generated crops and tiny COCO / mask-folder datasets shared by the dense tests (no Fashion-MNIST
needed)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

# A BiFormer small enough for tests: one block per stage, BRA in stages 1-3, attention with LePE in stage 4.
TINY = dict(depth=[1, 1, 1, 1], embed_dim=[32, 32, 64, 64], qk_dims=[32, 32, 64, 64], head_dim=32,
            topks=[1, 4, 4, -2], mlp_ratios=[2, 2, 2, 2])


def generated_crops(count: int = 40, side: int = 28, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, side, side) crops: filled ellipses of random size and brightness, labels cycling 0..classes-1."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:side, 0:side] - (side - 1) / 2
    crops = np.zeros((count, side, side), dtype=np.uint8)
    for i in range(count):
        radius_y, radius_x = rng.uniform(5, side / 2, size=2)
        inside = (rows / radius_y) ** 2 + (cols / radius_x) ** 2 <= 1
        crops[i][inside] = rng.integers(80, 256)
    return crops, np.arange(count) % classes


def write_coco(folder, annotation_name: str = "instances.json") -> None:
    """Two 40x30 images; categories 3 ("cat") and 7 ("dog"); image 2 has no annotation."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8)).save(folder / name)
    annotations = [
        # a 10 x 6 rectangle given as a polygon, category 7
        dict(id=1, image_id=1, category_id=7, bbox=[5, 4, 10, 6], area=60, iscrowd=0,
             segmentation=[[5, 4, 15, 4, 15, 10, 5, 10]]),
        dict(id=2, image_id=1, category_id=3, bbox=[20, 10, 8, 8], area=64, iscrowd=0,
             segmentation=[[20, 10, 28, 10, 28, 18, 20, 18]]),
        dict(id=3, image_id=1, category_id=3, bbox=[0, 0, 40, 30], area=1200, iscrowd=1,
             segmentation=[[0, 0, 40, 0, 40, 30, 0, 30]]),
    ]
    coco = dict(images=[dict(id=1, file_name="a.png", width=40, height=30),
                        dict(id=2, file_name="b.png", width=40, height=30)],
                annotations=annotations, categories=[dict(id=3, name="cat"), dict(id=7, name="dog")])
    (folder / annotation_name).write_text(json.dumps(coco))


def write_mask_folder(tmp_path, sizes=((20, 30), (24, 16)), images=None, masks=None) -> tuple:
    """Images (black) and palette-PNG masks of classes 0-2 in ``images`` and ``masks`` (default: TMP/images,
    TMP/masks); returns the two folders."""
    images, masks = images or tmp_path / "images", masks or tmp_path / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for index, (height, width) in enumerate(sizes):
        Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(images / f"{index}.jpg")
        mask = Image.fromarray((np.arange(height * width).reshape(height, width) % 3).astype(np.uint8), mode="L")
        mask = mask.convert("P")  # palette PNG: indices are the class ids
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        mask.save(masks / f"{index}.png")
    return images, masks
