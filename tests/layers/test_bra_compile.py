"""torch.compile: the default backend compiles with fullgraph=True and a dynamic batch; FlexAttention compiled
and eager is the reference's function. Kept to two tiny compilations (each costs seconds)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import biformer
from biformer import BiLevelRoutingAttention
from biformer.ops import routed_attention, routing_block_mask
from biformer.ops.backends.flex import flex_can_run

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")


def tiny_biformer() -> biformer.BiFormer:
    return biformer.BiFormer(
        depth=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=16, n_win=2,
        topks=[1, 2, 4, -2], mlp_ratios=[2, 2, 2, 2], num_classes=5, auto_pad=True,
    ).eval()


def test_default_backend_compiles_fullgraph_without_recompiling_for_a_new_batch():
    torch._dynamo.reset()
    model = tiny_biformer()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    first, second = torch.randn(2, 3, 40, 56), torch.randn(3, 3, 40, 56)
    torch._dynamo.mark_dynamic(first, 0)
    with torch.no_grad():
        out_first = compiled(first)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out_second = compiled(second)  # a recompile would raise here
        torch.testing.assert_close(out_first, model(first), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_second, model(second), atol=1e-5, rtol=1e-5)
        with biformer.attention_backend("reference"):
            torch.testing.assert_close(out_second, model(second), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk", [3, 1])  # top-1 uses the gather fallback inside the same graph (see ops.backends.flex)
def test_flex_backend_compiled_uses_flex_attention_and_matches_reference(topk):
    torch._dynamo.reset()
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    layer = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=topk, side_dwconv=3, auto_pad=True, backend="flex")
    x = torch.randn(2, 8, 10, 16)  # padded to 9 x 12: regions of 3 x 4 tokens, non-square
    compiled = torch.compile(layer, backend=recording_inductor, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out, routing = compiled(x, return_routing=True)
        layer.backend = "reference"
        expected, expected_routing = layer(x, return_routing=True)
    uses_flex = any("flex_attention" in str(node.target) for graph in graphs for node in graph.graph.nodes)
    assert uses_flex == (topk > 1)
    assert torch.equal(routing, expected_routing)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose here
def test_flex_block_mask_is_correct_in_eager_flex_attention():
    """Eager FlexAttention ignores the blocks and applies mask_mod densely: the mask_mod must be exact."""
    batch, regions, q_len, kv_len, heads, head_dim, topk = 2, 6, 3, 5, 2, 4, 2
    query = torch.randn(batch, regions, q_len, heads * head_dim)
    key_value = torch.randn(batch, regions, kv_len, 2 * heads * head_dim)
    topk_index = torch.stack([torch.randperm(regions)[:topk] for _ in range(batch * regions)]).view(
        batch, regions, topk
    )
    mask = routing_block_mask(topk_index, q_len, kv_len)

    def tokens(x):  # (N, R, L, heads * d) -> (N, heads, R * L, d)
        return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    channels = heads * head_dim
    out = flex_attention_module.flex_attention(
        tokens(query), tokens(key_value[..., :channels]), tokens(key_value[..., channels:]), block_mask=mask,
        scale=0.3,
    )
    out = out.transpose(1, 2).reshape(batch, regions, q_len, channels)
    expected = routed_attention(query, key_value, topk_index, num_heads=heads, scale=0.3, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_backend_outside_compile_or_with_cpu_gradients_falls_back_correctly():
    query, key, value = (torch.randn(2, 2, 4, 3, 4) for _ in range(3))
    assert not flex_can_run(query, key, value)  # eager: FlexAttention would be dense, so gather is used
    layer = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=2, side_dwconv=3, backend="flex")
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    out = layer(x)  # training on CPU: FlexAttention has no CPU backward
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    layer.backend = "reference"
    reference_out = layer(x)
    reference_out.square().sum().backward()
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-5)
