"""The three micro models built from the authors' constructor kwargs reproduce the authors' outputs."""

from __future__ import annotations

import pytest
import torch

import biformer
from conftest import assert_same_routing, fixture_state_dict, load_fixture

FIXTURES = {
    "biformer_micro": biformer.BiFormer,
    "biformer_stl_micro": biformer.BiFormerSTL,
    "biformer_stl_nchw_micro": biformer.BiFormerSTLNCHW,
}
BACKENDS = ["reference", "gather", "sdpa", "dense", "auto"]


@pytest.fixture(scope="module", params=list(FIXTURES))
def micro(request):
    tensors, meta = load_fixture(request.param)
    model = FIXTURES[request.param](**meta["constructor_kwargs"]).eval()
    model.load_state_dict(fixture_state_dict(tensors), strict=True)
    return model, tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_stored_output_and_routing(micro, backend):
    model, tensors = micro
    with torch.no_grad(), biformer.attention_backend(backend), biformer.record_routing(model) as routing:
        logits = model(tensors["input"])
        features, stage_outputs = model.forward_intermediates(tensors["input"])
    torch.testing.assert_close(logits, tensors["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features, tensors["features"], atol=1e-4, rtol=1e-4)
    stored = [i for i in range(4) if f"stage_outputs.{i}" in tensors]
    assert stored, "fixture has no stage outputs"
    for i in stored:
        torch.testing.assert_close(stage_outputs[i], tensors[f"stage_outputs.{i}"], atol=1e-4, rtol=1e-4)
    expected_routing = {k[len("routing.") : -len(".topk_index")]: v for k, v in tensors.items()
                        if k.startswith("routing.")}
    assert set(routing) == set(expected_routing)
    for name, indices in expected_routing.items():
        assert_same_routing(routing[name], indices)
