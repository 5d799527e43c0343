"""Make docs/routing.png: train a micro BiFormer to find Fashion-MNIST items in cluttered scenes, then draw
its routing with ``biformer show-routing``.

    python docs/make_routing_picture.py [--steps 500] [--batch-size 48] [--out runs/routing-demo]

Needs Fashion-MNIST as idx .gz files (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist). Each scene is a 112 x 112 picture with mild noise, a few faint rectangles
and one tinted item (40-56 px) at a random place; the label is the item's class. The network (BiFormer-T's
layout at micro width: depth 1,1,2,1, dims 32-128, n_win 7) has to find the item to classify it, so its
routing has something to show. Writes the model folder (Hub layout), docs/routing_scene.png and
docs/routing.png.
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import biformer  # noqa: F401 (registers the models)
from biformer.cli import main as biformer_cli
from biformer.hub import save_pretrained

DOCS = Path(__file__).resolve().parent
DATA = Path("/usr/share/datasets/fashion-mnist")
SCENE = 112
MICRO = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=10)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def scenes(items: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """uint8 (N, 3, SCENE, SCENE) scenes with one item each (items: (N, 28, 28) uint8); and the item boxes."""
    count = items.shape[0]
    canvas = 90 + 25 * torch.rand(count, 3, 1, 1, generator=generator) + 12 * torch.randn(
        count, 3, SCENE, SCENE, generator=generator)
    for _ in range(3):  # faint clutter
        for index in range(count):
            y, x, h, w = (int(v) for v in torch.randint(0, SCENE - 20, (4,), generator=generator))
            canvas[index, :, y : y + max(h // 3, 6), x : x + max(w // 3, 6)] += 35 * (
                torch.rand(3, 1, 1, generator=generator) - 0.5)
    boxes = []
    for index in range(count):
        size = int(torch.randint(40, 57, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, SCENE - size + 1, (2,), generator=generator))
        item = F.interpolate(items[index][None, None].float() / 255, size=(size, size), mode="bilinear")[0]
        tint = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=generator)
        region = canvas[index, :, y : y + size, x : x + size]
        canvas[index, :, y : y + size, x : x + size] = region * (1 - item) + 255 * tint * item
        boxes.append((x, y, size))
    return canvas.clamp(0, 255).to(torch.uint8), boxes


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def accuracy(model: torch.nn.Module, items: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(items), 200):
            images, _ = scenes(items[start : start + 200], generator)
            correct += (model(normalise(images)).argmax(-1) == labels[start : start + 200]).sum().item()
    model.train()
    return correct / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--out", default="runs/routing-demo", help="model folder to write (Hub layout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train_items = torch.from_numpy(read_idx(DATA / "train-images-idx3-ubyte.gz").copy())
    train_labels = torch.from_numpy(read_idx(DATA / "train-labels-idx1-ubyte.gz").astype(np.int64))
    test_items = torch.from_numpy(read_idx(DATA / "t10k-images-idx3-ubyte.gz").copy())
    test_labels = torch.from_numpy(read_idx(DATA / "t10k-labels-idx1-ubyte.gz").astype(np.int64))

    model = timm.create_model("biformer_tiny", **MICRO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(1)
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # warm-up then cosine
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        index = torch.randint(0, len(train_items), (args.batch_size,), generator=generator)
        images, _ = scenes(train_items[index], generator)
        loss = F.cross_entropy(model(normalise(images)), train_labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f} s", flush=True)
    test_generator = torch.Generator().manual_seed(2)
    test_accuracy = accuracy(model, test_items[:2000], test_labels[:2000], test_generator)
    print(f"test accuracy on 2000 scenes of unseen items: {test_accuracy:.1%}")
    folder = save_pretrained(model.eval(), args.out, overwrite=True)

    demo_generator = torch.Generator().manual_seed(7)
    scene, boxes = scenes(test_items[[0]], demo_generator)  # test item 0: an ankle boot
    Image.fromarray(scene[0].permute(1, 2, 0).numpy()).save(DOCS / "routing_scene.png")
    x, y, size = boxes[0]
    on_item, background = f"{x + size // 2},{y + size // 2}", f"{(x + size // 2 + SCENE // 2) % SCENE},{SCENE - 8}"
    print(f"item box x={x} y={y} size={size}; points {on_item} (item) and {background} (background)")
    biformer_cli(["show-routing", str(DOCS / "routing_scene.png"), "--checkpoint", str(folder), "--image-size",
                  str(SCENE), "--point", on_item, "--point", background, "-o", str(DOCS / "routing.png")])


if __name__ == "__main__":
    main()
