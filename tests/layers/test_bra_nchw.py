"""The refactored NCHW BRA against a plain float64 formulation (padding, ceil-mode grids, tiny maps)."""

from __future__ import annotations

import pytest
import torch

from biformer import BiLevelRoutingAttentionNCHW
from conftest import assert_same_routing
from plain_reference import plain_bra_nchw


@pytest.mark.parametrize(
    "n_win, topk, height, width",
    [(2, 2, 8, 8), (3, 4, 10, 7), (7, 16, 15, 9), (7, 16, 3, 5)],  # divisible, ceil grid, tiny (topk clamped)
)
@pytest.mark.parametrize("backend", ["reference", "gather", "sdpa", "dense"])
def test_matches_plain_float64_formulation(n_win, topk, height, width, backend):
    layer = BiLevelRoutingAttentionNCHW(dim=8, num_heads=2, n_win=n_win, topk=topk, side_dwconv=3, backend=backend)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    x = torch.randn(2, 8, height, width)
    out, routing = layer(x, return_routing=True)
    expected, expected_routing = plain_bra_nchw(x, layer)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert_same_routing(routing, expected_routing)


def test_bad_inputs():
    layer = BiLevelRoutingAttentionNCHW(dim=8, num_heads=2, n_win=2, topk=2)
    with pytest.raises(ValueError, match="8 channels"):
        layer(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttentionNCHW(dim=8, num_heads=2, n_win=2, topk=5)
