"""What the subcommands share: argument types, the one-line error report and the configuration flags.

Every subcommand module imports its helpers from here, never from another subcommand's module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["add_config_flags", "given_config_values", "one_line", "positive_int", "report_error"]


def positive_int(text: str) -> int:
    """A command-line integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x85``): a message that
    quotes a value given by the user stays one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def report_error(command: str, error: BaseException) -> int:
    """Print ``error`` as a one-line command error; exit code 2.

    An error raised in a data-loading worker process reaches us with the worker's traceback in its message
    (torch's ``DataLoader`` re-raises it so); only the original message, its last line, is shown.
    """
    message = str(error)
    if "\nOriginal Traceback" in message:
        kind, _, text = message.rstrip().splitlines()[-1].partition(": ")  # "module.ErrorType: the message"
        message = text if text and " " not in kind else kind
    print(f"biformer {command}: error: {one_line(message)}", file=sys.stderr)
    return 2


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per training option (all of them, or ``names``): the shared fields of
    :class:`~biformer.train.config.TrainConfig`, then each task's own options (from the task registry).

    Flags default to ``argparse.SUPPRESS``: only the ones given appear in the namespace, so they override
    the configuration file without hiding it.
    """
    from ..train.config import config_fields, is_flag_switch, option_default, option_tasks, parse_flag_value

    wanted = set(names) if names is not None else None
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for config_field in config_fields():
        if wanted is not None and config_field.name not in wanted:
            continue
        tasks = tuple(option_tasks(config_field.name))  # empty: shared by every task
        if tasks not in groups:
            title = (f"options of --task {', '.join(tasks)} (refused for the other tasks; also YAML keys)" if tasks
                     else "configuration options (also valid as keys of the YAML file)")
            groups[tasks] = parser.add_argument_group(title)
        group = groups[tasks]
        flag = "--" + config_field.name.replace("_", "-")
        default = option_default(config_field)
        help_text = f"{config_field.metadata['help']} (default: {default})"
        if is_flag_switch(config_field):
            group.add_argument(flag, dest=config_field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=config_field.name, default=argparse.SUPPRESS, help=help_text,
                               metavar=config_field.name.upper(), type=_converter(config_field, parse_flag_value))


def _converter(config_field: Any, parse: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        from ..train.errors import ConfigError

        try:
            return parse(config_field, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from error

    return convert


def given_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given as flags."""
    from ..train.config import config_fields

    return {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
