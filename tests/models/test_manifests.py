"""The five named variants have exactly the authors' state_dict: keys, shapes, order, parameter count."""

from __future__ import annotations

import pytest
import timm

import biformer
from conftest import load_manifest


@pytest.mark.parametrize("name", biformer.RELEASED_MODEL_NAMES)
def test_state_dict_equals_manifest(name):
    manifest = load_manifest(name)
    model = timm.create_model(name)
    assert [[key, list(value.shape)] for key, value in model.state_dict().items()] == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == set(manifest["buffer_keys"])
