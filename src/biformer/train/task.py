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
- ``unused_options`` (class attribute, optional): options of other tasks that this task does not read (e.g.
  ``mixup`` for segmentation). Giving one a value other than its default is an error, not silently ignored.

A batch is whatever the collate function returns (tensors, or tuples/lists/dicts of them); the engine
moves every tensor in it to the device. Tasks are registered by name with :func:`register_task`; the
configuration's ``task`` field picks one (``biformer train --task NAME``). The built-in tasks
(``classification``, and ``segmentation`` / ``detection`` from :mod:`biformer.dense.engine_tasks`) are
imported on first use (:data:`BUILTIN_TASK_MODULES`).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import ConfigError, TrainConfig

__all__ = ["BUILTIN_TASK_MODULES", "TASKS", "MetricSums", "Task", "TaskData", "check_task_options", "get_task",
           "register_task", "task_class", "task_defaults"]


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
    unused_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

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


TASKS: dict[str, type[Task]] = {}
# task name -> module that registers it, imported on first use
BUILTIN_TASK_MODULES = {
    "classification": "biformer.train.classification",
    "segmentation": "biformer.dense.engine_tasks",
    "detection": "biformer.dense.engine_tasks",
}


def register_task(task_class: type[Task]) -> type[Task]:
    """Class decorator: make ``task_class`` available as ``--task task_class.name``."""
    TASKS[task_class.name] = task_class
    return task_class


def task_class(name: str) -> type[Task]:
    """The Task class registered as ``name`` (importing a built-in task's module on first use)."""
    if name not in TASKS and name in BUILTIN_TASK_MODULES:
        importlib.import_module(BUILTIN_TASK_MODULES[name])
    if name not in TASKS:
        available = sorted(set(TASKS) | set(BUILTIN_TASK_MODULES))
        raise ConfigError(f"option 'task': unknown task {name!r}; available: {available}")
    return TASKS[name]


def task_defaults(name: str) -> dict[str, Any]:
    """The option values task ``name`` uses instead of TrainConfig's defaults (empty for unknown names: the
    error comes when the task is built)."""
    try:
        return dict(task_class(name).defaults)
    except ConfigError:
        return {}


def check_task_options(name: str, given: dict[str, Any]) -> None:
    """Refuse options ``given`` (by a file or flags) that task ``name`` would ignore (its ``unused_options``)
    unless they hold their default value (a resumed run's config.yaml lists every option)."""
    try:
        unused = task_class(name).unused_options
    except ConfigError:
        return  # an unknown task is reported when it is built
    defaults = TrainConfig()
    for option in unused:
        if option in given and given[option] != getattr(defaults, option):
            raise ConfigError(f"option {option!r}: not used by task {name!r} (got {given[option]!r}); "
                              f"remove it or choose another --task")


def get_task(config: TrainConfig) -> Task:
    """The Task the configuration names."""
    return task_class(config.task)(config)
