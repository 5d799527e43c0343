"""Small models and generated crops shared by the dense tests (no Fashion-MNIST needed)."""

from __future__ import annotations

import numpy as np

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
