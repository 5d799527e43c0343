"""The task registry: a task's own options become flags and YAML keys, and are refused for the other tasks."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import biformer.train
from biformer.cli import build_parser
from biformer.cli.common import given_config_values
from biformer.train import ConfigError, load_config
from biformer.train.classification import ClassificationTask
from biformer.train.options import TaskOptions, option
from biformer.train.registry import TASKS, register_task


@dataclass
class EchoOptions(TaskOptions):
    echo_depth: int = option(3, "how deep the echo goes")

    def validate(self, config) -> None:
        if self.echo_depth < 1:
            raise ConfigError(f"option 'echo_depth': expected an integer >= 1, got {self.echo_depth}")


class EchoTask(ClassificationTask):
    name = "echo"
    options_class = EchoOptions


@pytest.fixture
def echo_task(monkeypatch):
    monkeypatch.setitem(TASKS, "echo", EchoTask)  # removed again after the test
    register_task(EchoTask)
    return EchoTask


def test_a_registered_tasks_options_become_flags_and_yaml_keys(echo_task):
    args = build_parser().parse_args(["train", "--task", "echo", "--echo-depth", "5"])
    values = given_config_values(args)
    assert values == {"task": "echo", "echo_depth": 5}
    config = load_config((values, "flags"))
    assert config.options == EchoOptions(echo_depth=5) and config.to_dict()["echo_depth"] == 5
    assert "mixup" not in config.to_dict()  # classification's options are not echo's
    with pytest.raises(ConfigError, match="option 'echo_depth': expected an integer >= 1"):
        load_config(({"task": "echo", "echo_depth": 0}, "flags"))
    with pytest.raises(ConfigError, match="option 'echo_depth': not used by task 'classification' .*--task echo"):
        load_config(({"echo_depth": 5}, "flags"))
    with pytest.raises(ConfigError, match="option 'mixup': not used by task 'echo'"):
        load_config(({"task": "echo", "mixup": 0.5}, "flags"))


def test_registering_needs_an_options_dataclass():
    class Broken(ClassificationTask):
        name = "broken"
        options_class = dict

    with pytest.raises(TypeError, match="options_class must be a TaskOptions dataclass"):
        register_task(Broken)
    assert "broken" not in TASKS


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that the file imports (anywhere in it), relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    folder = Path(biformer.train.__file__).parent.parent / package.split(".")[-1]
    modules = {f"{package}.{path.stem}": path for path in folder.glob("*.py") if path.stem != "__init__"}
    return {name: _imports(path, package) & set(modules) for name, path in modules.items()}


def test_the_training_modules_import_without_a_circle():
    graph = _graph("biformer.train")
    assert "biformer.train.task" not in graph["biformer.train.config"]
    assert graph["biformer.train.errors"] == set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        for imported in graph[module]:
            assert imported not in path, f"import circle: {' -> '.join((*path, imported))}"
            visit(imported, (*path, imported))

    for module in graph:
        visit(module, (module,))
