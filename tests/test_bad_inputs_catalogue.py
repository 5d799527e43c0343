"""docs/bad-inputs.md: every test it names exists; the catalogue's cases not tested elsewhere; no unpickling."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import timm
import torch

import biformer  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "bad-inputs.md"
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_row_names_tests_that_exist():
    rows = [line for line in CATALOGUE.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    rows = [row for row in rows if not row.startswith("| given ")]
    assert len(rows) >= 50
    for row in rows:
        references = TEST_REFERENCE.findall(row)
        assert references, f"row without a test: {row[:80]}"
        for file, name in references:
            assert (ROOT / file).is_file(), f"{file} (named in docs/bad-inputs.md) does not exist"
            assert name in defined_tests(ROOT / file), f"{file}::{name} (named in docs/bad-inputs.md) does not exist"


@pytest.fixture(scope="module")
def micro():
    return timm.create_model("biformer_nano", num_classes=3, depth=[1, 1, 1, 1], embed_dim=[8, 16, 16, 16],
                             head_dim=8).eval()


def test_float64_input_to_a_float32_model(micro):
    with pytest.raises(RuntimeError, match=r"Input type \(double\) and bias type \(float\) should be the same"):
        micro(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_input_on_another_device_than_the_model(micro):
    # the "meta" device stands in for an accelerator on machines without one
    with pytest.raises(RuntimeError, match="device"):
        micro(torch.randn(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("size", [(1, 1), (3, 17), (7, 7)])
def test_tiny_images_are_padded_not_refused(micro, size):
    with torch.no_grad():
        logits = micro(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def _calls(tree: ast.AST, dotted_name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted_name]


def test_nothing_is_unpickled_beyond_weights_only():
    sources = sorted((ROOT / "src" / "biformer").rglob("*.py"))
    assert len(sources) > 20
    torch_loads = 0
    for path in sources:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names}
        assert not imported & {"pickle", "dill", "cloudpickle", "marshal", "shelve"}, path
        for call in _calls(tree, "torch.load"):
            keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}
            assert keywords.get("weights_only") == "True", f"{path}:{call.lineno}: torch.load without weights_only=True"
            torch_loads += 1
        for name in ("yaml.load", "yaml.unsafe_load", "numpy.load", "np.load"):
            assert not _calls(tree, name), f"{path}: {name}"
        if path.name != "export.py":  # export re-loads only the file it has just written, to check it
            assert not _calls(tree, "torch.jit.load") and not _calls(tree, "torch.export.load"), path
    assert torch_loads >= 2  # the weights reader and the training-state reader
