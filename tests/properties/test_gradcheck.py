"""torch.autograd.gradcheck in float64 for every attention backend that trains, and for whole layers."""

from __future__ import annotations

import pytest
import torch

from biformer import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW, available_backends
from biformer.ops import routed_attention

TRAINING_BACKENDS = [name for name in available_backends() if name != "flex"]  # flex: inference only on CPU


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_routed_attention_gradcheck(backend):
    query = torch.randn(1, 4, 2, 4, dtype=torch.float64, requires_grad=True)
    key_value = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    topk_index = torch.tensor([[[0, 3], [1, 2], [2, 0], [3, 1]]])

    def attention(q, kv):
        return routed_attention(q, kv, topk_index, num_heads=2, scale=0.7, backend=backend)

    assert torch.autograd.gradcheck(attention, (query, key_value))


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_bra_layer_gradcheck(backend):
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(4, num_heads=2, n_win=2, topk=2, side_dwconv=3, auto_pad=True,
                                    backend=backend).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_nchw_bra_layer_gradcheck():
    torch.manual_seed(0)
    layer = BiLevelRoutingAttentionNCHW(4, num_heads=2, n_win=2, topk=2, side_dwconv=3).double()
    x = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
