"""The Swin-layout models follow the authors where their options have no or a fixed effect: ``qk_scale`` (never
passed to their layers: refused unless None) and the last stage's LePE kernel of ``BiFormerSTLNCHW`` (always 5)."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer
from conftest import fixture_state_dict, load_fixture


@pytest.mark.parametrize("name", ["biformer_stl", "biformer_stl_nchw"])
def test_stl_qk_scale_is_refused_unless_none(name):
    """The authors' BiFormerSTL / nchwBiFormerSTL accept qk_scale and never use it: a value would silently differ
    from theirs (0.3 moved the logits by 0.68), so it is refused in one line; None (their default) builds."""
    with pytest.raises(ValueError, match=r"^qk_scale: the Swin-layout models do not use it .*expected None, got 0.3$"):
        timm.create_model(name, qk_scale=0.3, depth=[1, 1, 1, 1])
    torch.manual_seed(0)
    default = timm.create_model(name, depth=[1, 1, 1, 1], num_classes=3).eval()
    torch.manual_seed(0)
    given_none = timm.create_model(name, depth=[1, 1, 1, 1], num_classes=3, qk_scale=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(given_none(x), default(x), atol=0, rtol=0)


@pytest.mark.parametrize("side_dwconv", [3, 0])
def test_stl_nchw_last_stage_lepe_is_always_5x5(side_dwconv):
    """side_dwconv sets the BRA stages' kernel only: the authors' stage-4 nchwAttentionLePE keeps kernel 5, so
    their stage-4 weights load (here: the authors' micro fixture, BRA-stage LePE left out as it differs)."""
    tensors, meta = load_fixture("biformer_stl_nchw_micro")
    kwargs = {**meta["constructor_kwargs"], "side_dwconv": side_dwconv}
    model = biformer.BiFormerSTLNCHW(**kwargs)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items() if key.endswith("attn.lepe.weight")}
    last = [key for key in shapes if key.startswith("stages.3.")]
    assert last and all(shapes[key][-2:] == (5, 5) for key in last)
    assert all(shape[-2:] == (side_dwconv, side_dwconv) for key, shape in shapes.items() if key not in last)
    authors = fixture_state_dict(tensors)
    bra_lepe = {key for key in authors if key.endswith("attn.lepe.weight") or key.endswith("attn.lepe.bias")}
    bra_lepe = {key for key in bra_lepe if not key.startswith("stages.3.")}
    weights = {key: value for key, value in authors.items() if key not in bra_lepe}
    result = model.load_state_dict(weights, strict=False)  # raises on any shape mismatch
    assert not result.unexpected_keys
    assert set(result.missing_keys) == (bra_lepe if side_dwconv else set())
