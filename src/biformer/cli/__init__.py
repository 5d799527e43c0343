"""The ``biformer`` command line (also ``python -m biformer``).

Each subcommand lives in its own module of this package, listed in ``SUBCOMMANDS``; a module provides
``add_parser(subparsers) -> argparse.ArgumentParser`` (which must ``set_defaults(run=...)``) and the
``run(args) -> int`` function it names.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from .._optional import MissingDependency

# subcommand name -> module (relative to this package), in the order shown by --help
SUBCOMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "show-routing": "show_routing",
    "export": "export",
    "compare": "compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biformer",
        description="BiFormer (Bi-Level Routing Attention): train, evaluate, predict, visualise, export.",
    )
    parser.add_argument("--version", action="version", version=f"biformer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"{__name__}.{module_name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args) or 0)
    except MissingDependency as error:  # an optional package of the `cli` extra: one line, no traceback
        words = sys.argv[1:] if argv is None else argv
        command = next((f" {word}" for word in words if word in SUBCOMMANDS), "")
        print(f"biformer{command}: error: {error}", file=sys.stderr)
        return 2
