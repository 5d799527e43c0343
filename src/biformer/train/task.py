"""The Task interface: what the generic training engine needs to know about a kind of problem.

The engine (:mod:`biformer.train.engine`) knows nothing about images or labels. A Task supplies:

- ``build_data(splits, info=None)`` -> :class:`TaskData`: the training and evaluation datasets, the collate function
  that turns a list of samples into a batch, and ``info``: a JSON-able dict describing the data that the
  model depends on (class names, channels, input size, normalisation). ``info`` is stored in every
  checkpoint, so ``biformer eval`` / ``biformer predict`` rebuild the model and preprocessing from the
  weights file alone.
- ``build_model(info)`` -> ``nn.Module``: the network for that data (fine-tuning weights loaded when the
  configuration says so).
- ``training_loss(model, batch)`` -> ``(loss, batch_size)``: the scalar loss of one batch (already on the
  device), with any batch-level augmentation (mixup) applied inside. ``model`` may be wrapped in
  DistributedDataParallel: call it, do not reach into it.
- ``new_metrics(info)`` -> :class:`MetricSums`: an accumulator for evaluation. ``update(model, batch)``
  adds one batch; ``sums()`` lists the tensors the engine sums across processes; ``compute()`` turns the
  (summed) tensors into ``{name: value}``. Scalar values go to ``metrics.csv``; lists only to JSON.
- ``main_metric`` (class attribute): the key of ``compute()``'s dict that picks the "best" checkpoint
  (higher is better), and ``plot_metrics``: the keys drawn beside the loss in ``metrics.png``.

A batch is whatever the collate function returns (tensors, or tuples/lists/dicts of them); the engine
moves every tensor in it to the device. Tasks are registered by name with :func:`register_task`; the
configuration's ``task`` field picks one (``biformer train --task NAME``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import ConfigError, TrainConfig

__all__ = ["TASKS", "MetricSums", "Task", "TaskData", "get_task", "register_task"]


@dataclass
class TaskData:
    """Datasets of a run. ``train`` is None when only evaluating."""

    train: Dataset | None
    eval: Dataset | None
    collate_fn: Callable[[list], Any]
    info: dict[str, Any] = field(default_factory=dict)


class MetricSums(abc.ABC):
    """Evaluation accumulator whose state is a list of tensors that add up across processes."""

    @abc.abstractmethod
    def update(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` on one batch (on the device, in inference mode) and add to the sums."""

    @abc.abstractmethod
    def sums(self) -> list[torch.Tensor]:
        """The state tensors, summed in place over processes by the engine before :meth:`compute`."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """The metrics: ``{name: float}`` (plus lists, e.g. per-class values)."""


class Task(abc.ABC):
    """One kind of problem (classification, detection, ...) for the generic engine; see the module doc."""

    name: ClassVar[str]
    main_metric: ClassVar[str]
    plot_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def build_data(self, splits: tuple[str, ...] = ("train", "eval"), info: dict[str, Any] | None = None) -> TaskData:
        """Datasets for the requested splits (``"train"``, ``"eval"``; the others are None). ``info`` (from a
        checkpoint) fixes what the model depends on, e.g. the class names and preprocessing."""

    @abc.abstractmethod
    def build_model(self, info: dict[str, Any]) -> nn.Module:
        """The network for data described by ``info`` (from :meth:`build_data` or a checkpoint)."""

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Scalar loss of one training batch and the number of samples in it."""

    @abc.abstractmethod
    def new_metrics(self, info: dict[str, Any]) -> MetricSums:
        """A fresh evaluation accumulator."""


TASKS: dict[str, type[Task]] = {}


def register_task(task_class: type[Task]) -> type[Task]:
    """Class decorator: make ``task_class`` available as ``--task task_class.name``."""
    TASKS[task_class.name] = task_class
    return task_class


def get_task(config: TrainConfig) -> Task:
    """The Task the configuration names."""
    if config.task not in TASKS:
        raise ConfigError(f"option 'task': unknown task {config.task!r}; available: {sorted(TASKS)}")
    return TASKS[config.task](config)
