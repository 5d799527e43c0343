"""bf16 autocast on CPU: every backend runs, and stays within bf16 rounding of the float32 result."""

from __future__ import annotations

import pytest
import torch

from biformer import BiLevelRoutingAttention, attention_backend, available_backends


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("grad", [False, True])
def test_bf16_autocast_is_within_bf16_rounding_of_float32(backend, grad):
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=3, topk=3, side_dwconv=5, auto_pad=True)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.2)
    x = torch.randn(2, 10, 11, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad), attention_backend(backend):
        expected, expected_routing = layer(x, return_routing=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, routing = layer(x, return_routing=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # Routing from bf16 q/k may differ in near-ties; compare outputs where the regions agree.
    assert (routing.sort(-1).values == expected_routing.sort(-1).values).float().mean() > 0.9
    assert relative_error(out, expected.detach()) < 0.05  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    if grad:
        out.float().square().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_bf16_autocast_whole_model():
    import timm

    import biformer  # noqa: F401

    model = timm.create_model(
        "biformer_tiny", depth=[1, 1, 1, 1], embed_dim=[32, 64, 64, 64], qk_dims=[32, 64, 64, 64], num_classes=10
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert relative_error(out, expected) < 0.05
