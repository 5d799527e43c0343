"""Shared test helpers. Ground truth made by running the authors' code lives in tests/reference (see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parent / "reference"


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON sidecar of a reference fixture (``bra_layer``, ``biformer_micro``, ...)."""
    tensors_path, meta_path = REFERENCE / f"{name}.safetensors", REFERENCE / f"{name}.json"
    if not tensors_path.is_file():
        pytest.fail(f"reference fixture missing: {tensors_path} (see tests/reference/README.md)")
    return load_file(str(tensors_path)), json.loads(meta_path.read_text())


def fixture_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "state_dict."
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def load_manifest(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.keys.json").read_text())


def assert_same_routing(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Routed region indices equal as sets per query region."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.sort(dim=-1).values, expected.sort(dim=-1).values)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed every test; give the thread count back (training tests set ``threads: 1``)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
