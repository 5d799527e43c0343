"""Declaring options: the field helper shared by :class:`~biformer.train.config.TrainConfig` and the tasks'
option dataclasses, and :class:`TaskOptions`, the base of every task's options.

A task's options are a small dataclass of :func:`option` fields (one command-line flag and one YAML key each,
``head_channels`` -> ``--head-channels``) with a :meth:`TaskOptions.validate` method for their range checks.
The task registry (:mod:`biformer.train.registry`) merges them into the command line and the configuration
files; see :mod:`biformer.train.task`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["TaskOptions", "check_counts", "field_default", "option"]


def option(default: Any, help_text: str) -> Any:
    """A dataclass field with its command-line help; lists and dicts get a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=dict(help=help_text))
    return field(default=default, metadata=dict(help=help_text))


def field_default(option_field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (a fresh one for lists and dicts)."""
    if option_field.default_factory is not dataclasses.MISSING:
        return option_field.default_factory()
    return option_field.default


def check_counts(values: Any, counts: tuple[str, ...] = (), optional_counts: tuple[str, ...] = ()) -> None:
    """Options of ``values`` (an options object) that must be integers >= 1 (``counts``), or None or >= 1
    (``optional_counts``).

    Raises:
        ConfigError: ``option 'epochs': expected an integer >= 1, got 0``.
    """
    for name in counts:
        if getattr(values, name) < 1:
            raise ConfigError(f"option {name!r}: expected an integer >= 1, got {getattr(values, name)}")
    for name in optional_counts:
        value = getattr(values, name)
        if value is not None and value < 1:
            raise ConfigError(f"option {name!r}: expected None or an integer >= 1, got {value}")


@dataclass
class TaskOptions:
    """The options one task reads and the others do not (a task without own options uses this, empty).

    Subclasses are dataclasses of :func:`option` fields. Giving one of them while another ``--task`` is chosen
    is an error naming the option and the task (unless it holds its default value, as in an older run's
    ``config.yaml``, which listed every option).
    """

    def validate(self, config: Any) -> None:
        """Range and cross-field checks; ``config`` is the whole :class:`~biformer.train.config.TrainConfig`
        (for checks involving shared options). Raises ConfigError naming the option. The default checks
        nothing."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
