"""The import direction of src/biformer (docs/architecture.md): one way down, from the command line to the operators.

Read with ``ast`` from the source files (nothing is imported): every ``import`` and ``from ... import``, at the top
of a module or inside a function, absolute or relative. Imports by name at run time (``importlib.import_module``,
the task registry's built-in modules) are not import statements and are not checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The layers of the package, bottom first; docs/architecture.md shows the same table. A module may import from its
# own layer and from the layers below it, never from a layer above. Names are the top-level modules and packages
# of src/biformer ("__init__" is the package root, biformer/__init__.py, which registers the models with timm).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("_checks", "_optional", "files", "images", "locks")),
    ("operators, weights files", ("ops", "checkpoint")),
    ("layers", ("layers",)),
    ("models", ("models",)),
    ("model services", ("__init__", "routing", "model_files")),
    ("training", ("train",)),
    ("loading", ("hub",)),
    ("applications", ("dense", "visualize", "export", "comparison")),
    ("command line", ("cli", "__main__")),
)

# Imports against the direction, each with its reason: none today, and a new one fails the test. A row here is for
# a known exception being worked on (the test then also fails when the import is gone, so the row is deleted).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

SOURCE = Path(__file__).resolve().parents[1] / "src" / "biformer"
LAYER_OF = {name: index for index, (_, names) in enumerate(LAYERS) for name in names}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "biformer.train.config"
    imported: str  # the biformer module it imports (a submodule when "from package import submodule")
    line: int

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.imported}"


def module_name(path: Path) -> str:
    parts = ("biformer", *path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a biformer module in ``path`` (top-level and function-local)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # "from package import submodule" imports the submodule; "from module import name" the module
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:  # "import biformer.ops.attention as x" and the like
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.append(Import(name, target, node.lineno))
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    """Every import of a biformer module by a biformer module, once per (importer, imported, line)."""
    modules = source_modules()
    return tuple(dict.fromkeys(found for name, path in modules.items() for found in imports_of(name, path, modules)))


def unit(module: str) -> str:
    """The entry of :data:`LAYERS` a module belongs to: ``biformer.train.config`` -> ``train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    missing = sorted({unit(name) for name in source_modules()} - set(LAYER_OF))
    assert not missing, f"add {missing} to LAYERS (tests/test_architecture.py) and docs/architecture.md"


def test_the_imports_point_down_the_layers():
    against = {}
    for found in all_imports():
        source, target = LAYER_OF.get(unit(found.importer)), LAYER_OF.get(unit(found.imported))
        if source is not None and target is not None and target > source:
            against.setdefault((found.importer, found.imported), []).append(found)
    new = [str(found[0]) + f" (layer {LAYERS[LAYER_OF[unit(key[0])]][0]!r} below {LAYERS[LAYER_OF[unit(key[1])]][0]!r})"
           for key, found in sorted(against.items()) if key not in KNOWN_VIOLATIONS]
    assert not new, "imports from a layer above:\n" + "\n".join(new)
    gone = sorted(set(KNOWN_VIOLATIONS) - set(against))
    assert not gone, f"no longer imported, delete from KNOWN_VIOLATIONS: {gone}"


def test_no_subcommand_imports_another():
    from biformer.cli import SUBCOMMANDS

    subcommands = {f"biformer.cli.{module}" for module in SUBCOMMANDS.values()}
    crossing = [str(found) for found in all_imports()
                if found.importer in subcommands and found.imported in subcommands]
    assert not crossing, "a subcommand imports another:\n" + "\n".join(crossing)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports, among the modules of ``package`` (its ``__init__`` included)."""
    graph: dict[str, set[str]] = {}
    for found in all_imports():
        if all(name == package or name.startswith(package + ".") for name in (found.importer, found.imported)):
            graph.setdefault(found.importer, set()).add(found.imported)
            graph.setdefault(found.imported, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a", "f"}, "f": {"e"}, "g": {"g"}}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_inside_train():
    found = cycles(import_graph("biformer.train"))
    assert not found, f"import cycles inside biformer.train: {found}"
