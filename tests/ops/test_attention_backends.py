"""Every attention backend against a float64 loop formulation, and against each other."""

from __future__ import annotations

import pytest
import torch

from biformer.ops import available_backends, gather_routed, routed_attention, routing_mask
from biformer.ops.routing import route_regions

BACKENDS = [name for name in available_backends() if name != "auto"]


def plain_attention(query, key_value, topk_index, num_heads, scale):
    """Loops over batch, region and head in float64."""
    batch, regions, q_len, qk_dim = query.shape
    out = torch.zeros(batch, regions, q_len, key_value.shape[-1] - qk_dim, dtype=torch.float64)
    d_qk, d_v = qk_dim // num_heads, out.shape[-1] // num_heads
    for n in range(batch):
        for r in range(regions):
            kv = torch.cat([key_value[n, int(s)] for s in topk_index[n, r]]).double()
            for m in range(num_heads):
                q = query[n, r, :, m * d_qk : (m + 1) * d_qk].double()
                k = kv[:, m * d_qk : (m + 1) * d_qk]
                v = kv[:, qk_dim + m * d_v : qk_dim + (m + 1) * d_v]
                out[n, r, :, m * d_v : (m + 1) * d_v] = torch.softmax(q @ k.T * scale, -1) @ v
    return out


CASES = [
    # batch, regions, q_len, kv_len, qk_dim, v_dim, heads, topk
    (2, 16, 4, 4, 16, 16, 2, 3),
    (1, 9, 6, 6, 8, 24, 2, 9),  # qk_dim != v_dim, topk = all regions
    (3, 4, 1, 1, 4, 4, 1, 1),  # one token per region
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_plain_float64(backend, case):
    batch, regions, q_len, kv_len, qk_dim, v_dim, heads, topk = case
    query = torch.randn(batch, regions, q_len, qk_dim)
    key_value = torch.randn(batch, regions, kv_len, qk_dim + v_dim)
    topk_index = torch.stack([torch.randperm(regions)[:topk] for _ in range(batch * regions)]).view(
        batch, regions, topk
    )
    expected = plain_attention(query, key_value, topk_index, heads, 0.3)
    actual = routed_attention(query, key_value, topk_index, num_heads=heads, scale=0.3, backend=backend)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_float64_gradients_match(backend):
    query = torch.randn(2, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    key_value = torch.randn(2, 4, 4, 16, dtype=torch.float64, requires_grad=True)
    topk_index = torch.tensor([[[0, 1], [1, 2], [3, 0], [2, 3]]] * 2)
    out = routed_attention(query, key_value, topk_index, num_heads=2, scale=0.5, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (query, key_value))
    query_ref = query.detach().requires_grad_()
    key_value_ref = key_value.detach().requires_grad_()
    out_ref = routed_attention(query_ref, key_value_ref, topk_index, num_heads=2, scale=0.5, backend="reference")
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (query_ref, key_value_ref))
    for actual, expected in zip(grads, grads_ref):
        torch.testing.assert_close(actual, expected)


def test_gather_routed_is_per_batch():
    key_value = torch.arange(2 * 3 * 1 * 1.0).view(2, 3, 1, 1)
    index = torch.tensor([[[2], [0], [1]], [[1], [1], [0]]])
    gathered = gather_routed(key_value, index)  # (N*R, topk*L, C)
    assert gathered.flatten().tolist() == [2.0, 0.0, 1.0, 4.0, 4.0, 3.0]


def test_routing_mask_marks_routed_regions():
    index = torch.tensor([[[1, 2], [0, 0]]])
    mask = routing_mask(index, 3)
    assert mask.tolist() == [[[False, True, True], [True, False, False]]]


def test_routing_bias_is_the_token_level_mask():
    from biformer.ops.backends.dense import routing_bias

    index = torch.tensor([[[1, 2], [0, 0], [2, 1]]])  # 3 regions; region 1 routes to region 0 only
    q_len, kv_len = 2, 3
    bias = routing_bias(index, 3, q_len, kv_len, torch.float32)  # (1, 3 * 2, 3 * 3)
    assert bias.shape == (1, 6, 9) and bias.is_contiguous()
    mask = routing_mask(index, 3)[0]  # (R, R)
    for query_token in range(6):
        for key_token in range(9):
            routed = bool(mask[query_token // q_len, key_token // kv_len])
            assert bias[0, query_token, key_token].item() == (0.0 if routed else float("-inf"))


def test_route_regions_is_sorted_and_detached():
    query = torch.randn(1, 5, 4, requires_grad=True)
    key = torch.randn(1, 5, 4, requires_grad=True)
    index = route_regions(query, key, 3, 0.5)
    logits = (query @ key.transpose(1, 2)).detach()
    expected = logits.argsort(dim=-1, descending=True)[..., :3]
    assert torch.equal(index, expected)
    assert not index.requires_grad


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        routed_attention(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 4), torch.zeros(1, 1, 1, dtype=torch.long),
                         num_heads=1, scale=1.0, backend="nope")
