"""FlexAttention under torch.compile where it used to fail: a batch of 1, automatic dynamic shapes, a whole model.

One tiny model (a top-1 stage, then a FlexAttention stage) compiled once and called at batch 1 (static:
FlexAttention in the graph), then at batches 2 and 3 (torch.compile's automatic dynamic shapes: one
recompilation with a symbolic batch, where the backend falls back to gather); every output matches the eager
reference backend. Compiling on CPU is slow (C++ kernels), so this is the only whole-model flex compilation.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import biformer

pytest.importorskip("torch.nn.attention.flex_attention")


def test_one_layer_with_flex_compiles_at_batch_1():
    """The issue's case (top-1, no_grad, batch 1) raised "too many values to unpack" in inductor's CPU template."""
    torch._dynamo.reset()
    layer = biformer.BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1, side_dwconv=0, backend="flex").eval()
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        out = torch.compile(layer, dynamic=False)(x)
        layer.backend = "reference"
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # two whole-model compilations with C++ kernels: minutes on 2 CPU cores
def test_whole_model_with_flex_compiles_at_batch_1_and_with_dynamic_shapes():
    torch._dynamo.reset()
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    model = biformer.BiFormer(
        depth=[1, 1, 1, 1], embed_dim=[8, 8, 8, 8], qk_dims=[8, 8, 8, 8], head_dim=8, n_win=2,
        topks=[1, 2, 1, -2], mlp_ratios=[1, 1, 1, 1], num_classes=3, auto_pad=True, backend="flex",
    ).eval()
    compiled = torch.compile(model, backend=recording_inductor)  # dynamic=None: automatic dynamic shapes
    with torch.no_grad():
        for batch in (1, 2, 3):
            images = torch.randn(batch, 3, 32, 32)
            out = compiled(images)
            layers = [module for module in model.modules() if hasattr(module, "routing_sink")]
            for layer in layers:
                layer.backend = "reference"
            expected = model(images)
            for layer in layers:
                layer.backend = "flex"
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    flex_graphs = [any("flex_attention" in str(node.target) for node in graph.graph.nodes) for graph in graphs]
    assert flex_graphs[0]  # batch 1: FlexAttention compiled (it raised "too many values to unpack")
    assert len(graphs) == 2  # one graph per compilation (no graph break), one recompilation for the dynamic batch
