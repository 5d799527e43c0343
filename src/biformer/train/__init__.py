"""Training, evaluation and prediction for BiFormer models (the ``biformer train|eval|predict`` commands).

The engine is generic over a :class:`~biformer.train.task.Task` (see that module for the interface);
image classification (:mod:`biformer.train.classification`) is the first one. Importing this package
registers the ``classification`` task (``biformer_nano`` is registered by ``import biformer``).
"""

from . import classification  # noqa: F401  (registers the classification task)
from .config import TrainConfig, load_config, load_yaml, save_config
from .engine import Trainer, evaluate
from .errors import ConfigError, DataError
from .options import TaskOptions
from .task import TASKS, MetricSums, Task, TaskData, get_task, register_task

__all__ = [
    "TASKS",
    "ConfigError",
    "DataError",
    "MetricSums",
    "Task",
    "TaskData",
    "TaskOptions",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "get_task",
    "load_config",
    "load_yaml",
    "register_task",
    "save_config",
]
