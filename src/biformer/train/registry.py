"""The task registry: which tasks exist, the options each one owns, and the options shared by all.

A task is registered by name with :func:`register_task` (a class decorator on a
:class:`~biformer.train.task.Task` subclass). Its ``options_class`` (a
:class:`~biformer.train.options.TaskOptions` dataclass) lists the options only it reads; the registry merges
them into the command line (``biformer train`` / ``eval`` flags) and the configuration files, and refuses an
option given for a task that does not own it. The built-in tasks are imported on first use
(:data:`BUILTIN_TASK_MODULES`), so asking for every option imports their modules.

This module imports nothing of the package but :mod:`biformer.train.errors` and
:mod:`biformer.train.options`: the configuration (:mod:`biformer.train.config`) and the Task interface
(:mod:`biformer.train.task`) both read it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .errors import ConfigError
from .options import TaskOptions, field_default

__all__ = ["BUILTIN_TASK_MODULES", "TASKS", "check_task_options", "option_owners", "register_task", "task_class",
           "task_defaults", "task_option_fields", "task_options_class"]

TASKS: dict[str, type] = {}  # name -> Task subclass
# task name -> module that registers it, imported on first use
BUILTIN_TASK_MODULES = {
    "classification": "biformer.train.classification",
    "segmentation": "biformer.dense.engine_tasks",
    "detection": "biformer.dense.engine_tasks",
}


def register_task(task_class: type) -> type:
    """Class decorator: make ``task_class`` available as ``--task task_class.name``; its ``options_class``
    fields become flags and YAML keys."""
    options_class = getattr(task_class, "options_class", TaskOptions)
    if not (isinstance(options_class, type) and issubclass(options_class, TaskOptions)
            and dataclasses.is_dataclass(options_class)):
        raise TypeError(f"register_task: {task_class.__name__}.options_class must be a TaskOptions dataclass, "
                        f"got {options_class!r}")
    TASKS[task_class.name] = task_class
    return task_class


def task_class(name: str) -> type:
    """The Task class registered as ``name`` (importing a built-in task's module on first use)."""
    if name not in TASKS and name in BUILTIN_TASK_MODULES:
        importlib.import_module(BUILTIN_TASK_MODULES[name])
    if name not in TASKS:
        available = sorted(set(TASKS) | set(BUILTIN_TASK_MODULES))
        raise ConfigError(f"option 'task': unknown task {name!r}; available: {available}")
    return TASKS[name]


def task_options_class(name: str) -> type[TaskOptions]:
    """The options dataclass of task ``name``."""
    return getattr(task_class(name), "options_class", TaskOptions)


def task_defaults(name: str) -> dict[str, Any]:
    """The shared option values task ``name`` uses instead of TrainConfig's defaults (empty for unknown names:
    the error comes when the task is built)."""
    try:
        return dict(task_class(name).defaults)
    except ConfigError:
        return {}


def _all_task_names() -> list[str]:
    """The built-in tasks (imported now) and the registered ones, built-in first."""
    for name in BUILTIN_TASK_MODULES:
        task_class(name)
    return list(dict.fromkeys([*BUILTIN_TASK_MODULES, *TASKS]))


def task_option_fields() -> dict[str, dataclasses.Field]:
    """Every task's own option fields by name, in registry order (an option several tasks own appears once)."""
    found: dict[str, dataclasses.Field] = {}
    for name in _all_task_names():
        for option_field in dataclasses.fields(task_options_class(name)):
            found.setdefault(option_field.name, option_field)
    return found


def option_owners() -> dict[str, list[str]]:
    """Option name -> the tasks that own it (for the help text and the messages)."""
    owners: dict[str, list[str]] = {}
    for name in _all_task_names():
        for option_field in dataclasses.fields(task_options_class(name)):
            owners.setdefault(option_field.name, []).append(name)
    return owners


def check_task_options(name: str, given: dict[str, Any]) -> None:
    """Refuse options in ``given`` (by a file or flags) that belong to other tasks than ``name``, unless they
    hold their default value there (an older run's ``config.yaml`` listed every option of every task).

    Raises:
        ConfigError: ``option 'mixup': not used by task 'segmentation' (got 0.8); ...``.
    """
    own = {f.name for f in dataclasses.fields(task_options_class(name))}
    for option_name, value in given.items():
        if option_name in own:
            continue
        owners = [task for task in _all_task_names()
                  if option_name in {f.name for f in dataclasses.fields(task_options_class(task))}]
        if not owners:
            continue  # a shared option (or an unknown one, reported by the name check)
        defaults = [field_default(f) for task in owners for f in dataclasses.fields(task_options_class(task))
                    if f.name == option_name]
        if value not in defaults:
            raise ConfigError(f"option {option_name!r}: not used by task {name!r} (got {value!r}); it is an option "
                              f"of --task {', '.join(owners)}: remove it or choose another --task")
