"""The Task interface: what the generic training engine needs to know about a kind of problem.

The engine (:mod:`biformer.train.engine`) knows nothing about images or labels. A Task supplies:

- ``build_data(splits, info=None)`` -> :class:`TaskData`: the training and evaluation datasets, the collate function
  that turns a list of samples into a batch, and ``info``: a JSON-able dict describing the data that the
  model depends on (class names, channels, input size, normalisation). ``info`` is stored in every
  checkpoint, so ``biformer eval`` / ``biformer predict`` rebuild the model and preprocessing from the
  weights file alone.
- ``build_model(info)`` -> ``nn.Module``: the network for that data (fine-tuning weights loaded when the
  configuration says so).
- ``check_options()`` (optional): called by the engine before any data is read; raises ConfigError (naming the
  option) for a model name, model arguments or weights file that :meth:`build_model` would refuse later, so
  that a mistyped option is reported at once and not after the data has been read.
- ``training_loss(model, batch)`` -> ``(loss, batch_size)``: the scalar loss of one batch (already on the
  device), with any batch-level augmentation (mixup) applied inside. ``model`` may be wrapped in
  DistributedDataParallel: call it, do not reach into it.
- ``new_metrics(info)`` -> :class:`MetricSums`: an accumulator for evaluation. ``update(model, batch)``
  adds one batch; ``sums()`` lists the tensors the engine sums across processes; ``gather(gather_objects)``
  (optional) merges state that does not add up, e.g. detection's per-image predictions:
  ``gather_objects(value)`` returns every process's ``value`` in rank order (``all_gather_object``; in one
  process ``[value]``); the engine calls it once, after summing; ``compute()`` turns the (summed, gathered)
  state into ``{name: value}``. Scalar values go to ``metrics.csv``; lists only to JSON.
- ``main_metric`` (class attribute): the key of ``compute()``'s dict that picks the "best" checkpoint
  (higher is better), and ``plot_metrics``: the keys drawn beside the loss in ``metrics.png``.
- ``defaults`` (class attribute, optional): values of shared options that differ for this task from
  :class:`~biformer.train.config.TrainConfig`'s (the classification quick start's), e.g. ``dataset`` or
  ``model``. :func:`~biformer.train.config.load_config` applies them beneath the YAML file and the flags.
- ``options_class`` (class attribute, optional): a :class:`~biformer.train.options.TaskOptions` dataclass of the
  options only this task reads (e.g. ``mixup`` for classification). The registry makes each a flag and a YAML
  key; the run's values are ``config.options`` (also ``self.options``). Giving one while another task is
  chosen is an error naming the option and the task, not silently ignored.

A batch is whatever the collate function returns (tensors, or tuples/lists/dicts of them); the engine
moves every tensor in it to the device. Tasks are registered by name with :func:`register_task`
(:mod:`biformer.train.registry`); the configuration's ``task`` field picks one (``biformer train --task
NAME``). The built-in tasks (``classification``, and ``segmentation`` / ``detection`` from
:mod:`biformer.dense.engine_tasks`) are imported on first use (:data:`BUILTIN_TASK_MODULES`).

Adding a task: one module with a ``Task`` subclass, its ``TaskOptions`` dataclass and ``@register_task``
(imported before use, or listed in :data:`BUILTIN_TASK_MODULES` for a built-in one).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import TrainConfig
from .options import TaskOptions
from .registry import BUILTIN_TASK_MODULES, TASKS, check_task_options, register_task, task_class, task_defaults

__all__ = ["BUILTIN_TASK_MODULES", "TASKS", "MetricSums", "Task", "TaskData", "TaskOptions", "check_task_options",
           "get_task", "register_task", "task_class", "task_defaults"]


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

    def gather(self, gather_objects: Callable[[Any], list[Any]]) -> None:  # noqa: B027 - optional hook
        """Merge state that does not add up across processes (called once by the engine, after the sums).

        ``gather_objects(value)`` returns the list of every process's ``value`` (rank order; ``[value]`` in
        one process). The default does nothing: all the state is in :meth:`sums`.
        """

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """The metrics: ``{name: float}`` (plus lists, e.g. per-class values)."""


class Task(abc.ABC):
    """One kind of problem (classification, detection, ...) for the generic engine; see the module doc."""

    name: ClassVar[str]
    main_metric: ClassVar[str]
    plot_metrics: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    options_class: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        options = config.options if config.options is not None else self.options_class()
        if not isinstance(options, self.options_class):
            raise TypeError(f"{type(self).__name__}: config.options must be a {self.options_class.__name__}, got "
                            f"{type(options).__name__} (the configuration is for task {config.task!r})")
        self.options = options

    def check_options(self) -> None:  # noqa: B027 - optional hook
        """Refuse options that :meth:`build_model` would refuse, before any data is read (see the module doc).
        The default checks nothing."""

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


def get_task(config: TrainConfig) -> Task:
    """The Task the configuration names."""
    return task_class(config.task)(config)
