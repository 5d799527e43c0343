"""The command line's modules: the shared helpers in one module, no subcommand importing another."""

from __future__ import annotations

import ast
from pathlib import Path

import biformer.cli

SUBCOMMAND_MODULES = {path.stem for path in Path(biformer.cli.__file__).parent.glob("*.py")} - {"__init__", "common"}


def _imported_cli_modules(path: Path) -> set[str]:
    """Names of the ``biformer.cli`` modules the file imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("biformer.cli."):
            found.add(node.module.removeprefix("biformer.cli."))
    return found


def test_no_subcommand_module_imports_another():
    assert {"train", "evaluate", "predict", "export", "show_routing", "compare"} <= SUBCOMMAND_MODULES
    folder = Path(biformer.cli.__file__).parent
    for name in sorted(SUBCOMMAND_MODULES):
        imported = _imported_cli_modules(folder / f"{name}.py") & SUBCOMMAND_MODULES
        assert not imported, f"biformer/cli/{name}.py imports the subcommand module(s) {sorted(imported)}"


def test_the_shared_helpers_keep_their_old_names():
    from biformer.cli import common, show_routing, train

    assert train.report_error is common.report_error and train.one_line is common.one_line
    assert train.add_config_flags is common.add_config_flags
    assert train.given_config_values is common.given_config_values
    assert show_routing.positive_int is common.positive_int
