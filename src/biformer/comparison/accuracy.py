"""Accuracy of each attention type after the same training budget, with the ``biformer train`` engine.

Every run is a :class:`~biformer.train.engine.Trainer` run with the same recipe (the ``biformer train``
defaults: AdamW, cosine schedule with warm-up, label smoothing, flips) and the same fixed number of epochs
over the same fixed training subset, so every type gets the same number of optimizer steps whatever the
machine's load; the wall time of each run is recorded beside its result. Only ``attn_type`` changes
between the runs of one seed. The model is evaluated once, at the end (``eval_every`` = ``epochs``).

The training subset is a folder of idx files holding the first ``train_samples`` images of Fashion-MNIST's
training split (its order is already shuffled) and links to the full 10,000-image test split, written into
the comparison's run folder and passed to the engine as ``data_dir``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TrainingResult", "check_trainable", "classification_config", "fashion_mnist_subset",
           "segmentation_config", "train", "write_idx"]

IDX_UINT8 = 0x08


@dataclass
class TrainingResult:
    """One training run of one attention type and seed."""

    task: str
    attn_type: str
    seed: int
    metric: str  # the task's main metric: "top1" (percent) or "mIoU" (0..1)
    value: float
    metrics: dict[str, float] = field(default_factory=dict)  # every scalar metric of the final evaluation
    params: int = 0
    epochs: int = 0
    steps: int = 0
    train_samples: int = 0
    seconds: float = 0.0  # wall time of the run: data, training and evaluations
    load_average: list[float] = field(default_factory=list)  # 1-minute load average at the start and the end
    run_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array in the (uncompressed) idx format: 0, 0, dtype code, ndim, big-endian sizes, data."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UINT8, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.tobytes())
    return path


def fashion_mnist_subset(
    target: str | os.PathLike, train_samples: int, source: str | os.PathLike | None = None
) -> Path:
    """A Fashion-MNIST folder for the engine: the first ``train_samples`` training images and labels, and
    links to the full test split. ``source``: the dataset folder (None: where ``biformer train`` finds it).

    Raises:
        DataError: Fashion-MNIST not found, or fewer than ``train_samples`` training images.
    """
    from ..train.data import _IDX_FILES, DataError, _idx_file, find_fashion_mnist, read_idx

    source = find_fashion_mnist(source, download=False)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    images_stem, labels_stem = _IDX_FILES["train"]
    images = read_idx(_idx_file(source, images_stem))  # (60000, 28, 28) uint8
    labels = read_idx(_idx_file(source, labels_stem))  # (60000,) uint8
    if len(images) < train_samples:
        raise DataError(f"--train-samples: Fashion-MNIST in {source} has {len(images)} training images, "
                        f"asked for {train_samples}")
    write_idx(target / images_stem, images[:train_samples])
    write_idx(target / labels_stem, labels[:train_samples])
    for stem in _IDX_FILES["test"]:
        original = _idx_file(source, stem).resolve()
        link = target / original.name
        if not link.exists():
            link.symlink_to(original)
    return target


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def classification_config(
    attn_type: str,
    seed: int,
    data_dir: str | os.PathLike,
    model: str = "biformer_nano",
    model_kwargs: dict[str, Any] | None = None,
    epochs: int = 2,
    threads: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """Configuration values of a ``biformer train`` run of ``model`` with ``attn_type`` on the Fashion-MNIST
    folder ``data_dir`` (see :func:`fashion_mnist_subset`). ``model_kwargs``: more model arguments (default:
    the engine's, regions for 32 px images); ``options``: more :class:`~biformer.train.config.TrainConfig`
    values (``input_size``, ``time_limit`` ...)."""
    from ..train.config import TrainConfig

    kwargs = TrainConfig().model_kwargs if model_kwargs is None else model_kwargs
    return dict(
        task="classification", model=model, model_kwargs={**kwargs, "attn_type": attn_type},
        dataset="fashion-mnist", data_dir=str(data_dir), download=False, epochs=epochs, eval_every=epochs,
        seed=seed, threads=threads, workers=0, progress=False, **options,
    )


def segmentation_config(
    attn_type: str,
    seed: int,
    model: str = "shallow",
    model_kwargs: dict[str, Any] | None = None,
    epochs: int = 2,
    threads: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """Configuration values of a ``biformer train --task segmentation`` run (Semantic FPN on the built-in
    scenes; backbone ``model``: a preset of :mod:`biformer.dense.engine_tasks` or a BiFormer name) with
    ``attn_type`` in the backbone; ``options``: more :class:`~biformer.train.config.TrainConfig` values
    (``train_scenes``, ``val_scenes``, ``input_size``, ``data_dir``)."""
    return dict(
        task="segmentation", model=model, model_kwargs={**(model_kwargs or {}), "attn_type": attn_type},
        epochs=epochs, eval_every=epochs, seed=seed, threads=threads, progress=False, **options,
    )


def check_trainable(values: dict[str, Any]) -> None:
    """Build the model of the run ``values`` describes, as the engine does, and run it on one zero batch:
    a type that cannot work with the configuration fails here, before any training.

    Raises:
        ConfigError: the configuration or the model cannot be built (message from the engine).
        ValueError, RuntimeError: the model fails on an input of the configured size.
    """
    import torch

    from ..train import load_config
    from ..train.task import get_task

    config = load_config((values, "biformer compare"))
    channels = 1 if config.task == "classification" and config.dataset == "fashion-mnist" else 3
    info = dict(class_names=[str(index) for index in range(10)], num_classes=10, in_chans=channels,
                input_size=config.input_size)
    model = get_task(config).build_model(info).eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, config.input_size, config.input_size))  # (1, C, H, W)


def train(values: dict[str, Any], run_dir: str | os.PathLike) -> TrainingResult:
    """Train with the configuration ``values`` in ``run_dir`` (a :class:`~biformer.train.engine.Trainer` run);
    the final evaluation and what the run cost."""
    return _fit(values, run_dir, values["model_kwargs"]["attn_type"], values["seed"])


def _fit(values: dict[str, Any], run_dir: str | os.PathLike, attn_type: str, seed: int) -> TrainingResult:
    """Train with the configuration ``values`` in ``run_dir`` (a :class:`~biformer.train.engine.Trainer` run);
    the final evaluation and what the run cost."""
    from ..train import Trainer, load_config

    config = load_config((values, "biformer compare"))
    load_at_start = os.getloadavg()[0]
    start = time.perf_counter()
    with Trainer(config, run_dir=run_dir) as trainer:
        summary = trainer.fit()
        params = sum(parameter.numel() for parameter in trainer.model.parameters())
        samples = len(trainer.data.train)
    final = _scalars(summary["final"])
    return TrainingResult(
        task=config.task, attn_type=attn_type, seed=seed, metric=summary["main_metric"],
        value=final[summary["main_metric"]], metrics=final, params=params, epochs=summary["epochs_completed"],
        steps=summary["steps"], train_samples=samples, seconds=time.perf_counter() - start,
        load_average=[round(load_at_start, 2), round(os.getloadavg()[0], 2)], run_dir=str(run_dir),
    )
