"""Nested ``record_routing`` blocks: each records while its block runs, the outer one after the inner exits."""

from __future__ import annotations

import timm
import torch

import biformer


def test_nested_recorders_both_record():
    model = timm.create_model("biformer_nano", num_classes=3, depth=[1, 1, 1, 1], embed_dim=[8, 16, 16, 16],
                              qk_dims=[8, 16, 16, 16], head_dim=8, n_win=2, topks=[1, 2, 4, -2]).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), biformer.record_routing(model) as outer:
        with biformer.record_routing(model.stages[1]) as inner:
            model(images)
        assert set(inner) == {"0.attn"} and set(outer) == {"stages.0.0.attn", "stages.1.0.attn", "stages.2.0.attn"}
        outer.clear()
        model(images)  # after the inner block: the outer one still records
        assert set(outer) == {"stages.0.0.attn", "stages.1.0.attn", "stages.2.0.attn"}
        torch.testing.assert_close(outer["stages.1.0.attn"], inner["0.attn"])
    assert all(layer.routing_sink is None for layer in model.modules() if hasattr(layer, "routing_sink"))
