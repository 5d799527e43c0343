"""Does the data pipeline starve the training step? Loader alone vs training step vs both, side by side.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_loader.py     # about 3 minutes on 2 cores

Two datasets, generated in a temporary folder (the machine has no dataset): Fashion-MNIST in its idx format
(6,400 training images, 28 x 28, the quick start's pipeline and model: biformer_nano at 32 px, batch 128) and
a folder of 224 x 224 JPEGs (10 classes, the ImageNet recipe's augmentation: random-resized crop, flip,
RandAugment m9, random erasing, then mixup/cutmix in the step; biformer_tiny, batch 16). For each number of
data-loading workers (0: in the training process) the loaders are built exactly as ``biformer train`` builds
them (``Trainer``), then:

- loader alone: images/s over the batches after the first (workers already running), and the wait for the
  first batch of the second epoch (worker start-up, with and without ``persistent_workers``);
- training step alone: forward, backward and AdamW step on one cached batch (images/s), measured again in
  every row because the load of a shared machine drifts;
- both: the training loop over the loader (images/s).

Also: the cost of the per-image seeding that makes mid-epoch resumption exact (``SeededSamples``), as loader
images/s in the training process with and without it. One torch thread per process. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from biformer.train import Trainer, load_config, load_yaml
from biformer.train.engine import move_to
from biformer.train.precision import autocast
from biformer.train.recipes import resolve_config


def write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, train: int, test: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 255, (count, 28, 28))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_jpeg_folder(root: Path, per_class: int) -> Path:
    """224 px JPEGs (quality 90) of smooth random colour fields with noise: decoding cost like a photo's."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for number in range(count):
                low = rng.integers(0, 255, (7, 7, 3)).astype(np.uint8)
                field = np.asarray(Image.fromarray(low).resize((224, 224), Image.BICUBIC), dtype=np.int16)
                pixels = np.clip(field + rng.integers(-20, 20, field.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{number}.jpg", quality=90)
    return root


def train_step(trainer: Trainer, batch: object) -> None:
    with autocast(trainer.dist.device, trainer.config.precision):
        loss, _ = trainer.task.training_loss(trainer.train_model, move_to(batch, trainer.dist.device))
    trainer.guard.backward(loss)
    trainer.guard.step(trainer.optimizer)
    trainer.optimizer.zero_grad(set_to_none=True)


def loader_alone(trainer: Trainer, batches: int) -> tuple[float, float]:
    """(images/s after the first batch of epoch 1, seconds to the first batch of epoch 2)."""
    loader, size = trainer.train_loader, trainer.config.batch_size
    trainer.train_sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    rate = (batches - 1) * size / (time.perf_counter() - start)
    for _ in iterator:  # finish the epoch as training does
        pass
    trainer.train_sampler.set_epoch(1)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    del iterator
    return rate, first


def step_alone(trainer: Trainer, steps: int) -> float:
    trainer.train_sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    train_step(trainer, batch)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(trainer, batch)
    return steps * trainer.config.batch_size / (time.perf_counter() - start)


def both(trainer: Trainer, batches: int) -> float:
    trainer.train_sampler.set_epoch(2)
    iterator = iter(trainer.train_loader)
    train_step(trainer, next(iterator))  # workers started, model warm
    start = time.perf_counter()
    for _ in range(batches - 1):
        train_step(trainer, next(iterator))
    return (batches - 1) * trainer.config.batch_size / (time.perf_counter() - start)


def seeding_cost(trainer: Trainer, images: int, rounds: int = 3) -> tuple[float, float]:
    """Loader images/s in the training process (workers 0) with and without the per-image seeding: the best
    of ``rounds`` alternating passes each (the same images, so the file cache is equally warm)."""
    dataset = trainer.data.train
    plain = DataLoader(dataset, batch_size=trainer.config.batch_size, shuffle=True,
                       collate_fn=trainer.data.collate_fn)
    best = [0.0, 0.0]
    for _ in range(rounds):
        for which, loader in enumerate((trainer.train_loader, plain)):
            trainer.train_sampler.set_epoch(0)
            start, seen = time.perf_counter(), 0
            for images_batch, _labels in loader:
                seen += len(images_batch)
                if seen >= images:
                    break
            best[which] = max(best[which], seen / (time.perf_counter() - start))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,1,2", help="worker counts to compare (default: 0,1,2)")
    args = parser.parse_args()
    workers = [int(value) for value in args.workers.split(",")]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        fashion = make_fashion_mnist(root / "fashion", 6400, 256)
        jpegs = make_jpeg_folder(root / "jpegs", 32)
        suites = [
            ("Fashion-MNIST idx, biformer_nano 32 px, batch 128 (the quick start)",
             [(dict(dataset="fashion-mnist", data_dir=str(fashion), download=False, batch_size=128), "test")],
             20, 6),
            ("224 px JPEG folder, biformer_tiny, batch 16 (imagenet/biformer_tiny recipe, fp32)",
             [(load_yaml(resolve_config("imagenet/biformer_tiny")), "recipe"),
              (dict(data_dir=str(jpegs), batch_size=16, precision="fp32", threads=1), "test")],
             6, 1),
        ]
        for title, layers, batches, steps in suites:
            print(f"\n### {title}\n")
            print("| workers | persistent | loader alone (img/s) | 1st batch of epoch 2 (s) | training step alone "
                  "(img/s) | loader + step (img/s) | step / loader |")
            print("|---|---|---|---|---|---|---|")
            for count in workers:
                for persistent in ((True, False) if count else (True,)):
                    extra = dict(workers=count, persistent_workers=persistent, progress=False, tensorboard=False,
                                 output=str(root / "runs"), threads=1, checkpoint_minutes=None)
                    config = load_config(*layers, (extra, "bench"))
                    trainer = Trainer(config, run_dir=root / "runs" / f"{count}-{persistent}-{time.time()}")
                    rate, first = loader_alone(trainer, batches)
                    step_rate = step_alone(trainer, steps)  # in every row: the machine's load drifts
                    combined = both(trainer, min(batches, len(trainer.train_loader)))
                    print(f"| {count} | {'yes' if persistent and count else 'no' if count else '-'} | {rate:.0f} | "
                          f"{first:.2f} | {step_rate:.0f} | {combined:.0f} | {step_rate / rate:.2f} |")
                    if count == 0:
                        seeded, plain = seeding_cost(trainer, batches * config.batch_size)
                        seeding_note = (f"per-image seeding (workers 0): {seeded:.0f} img/s seeded vs {plain:.0f} "
                                        f"img/s unseeded ({100 * (plain - seeded) / plain:+.1f}% cost)")
                    trainer.close()
            print(f"\n{seeding_note}")
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
