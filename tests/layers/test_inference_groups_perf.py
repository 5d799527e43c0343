"""Inference runs each stage on groups of images (cache-sized temporaries): same numbers as the whole batch."""

from __future__ import annotations

import torch

import biformer
import biformer.models._pyramid as pyramid
from biformer.models._pyramid import inference_group_size


def small_biformer() -> biformer.BiFormer:
    torch.manual_seed(0)
    return biformer.BiFormer(
        depth=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=16, n_win=2,
        topks=[1, 2, 4, -2], mlp_ratios=[2, 2, 2, 2], num_classes=5, auto_pad=True,
    ).eval()


def test_grouped_inference_equals_whole_batch(monkeypatch):
    model = small_biformer()
    images = torch.randn(5, 3, 48, 40)
    with torch.no_grad():
        monkeypatch.setattr(pyramid, "INFERENCE_GROUP_BYTES", 1)  # one image per group at every stage
        assert inference_group_size(model.stages[0], torch.zeros(5, 16, 12, 10)) == 1
        grouped = model(images)
        monkeypatch.setattr(pyramid, "INFERENCE_GROUP_BYTES", 2**40)  # the whole batch at once
        assert inference_group_size(model.stages[0], torch.zeros(5, 16, 12, 10)) is None
        whole = model(images)
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=1e-5)


def test_groups_only_without_gradients_and_never_for_the_reference_formulation(monkeypatch):
    model = small_biformer()
    monkeypatch.setattr(pyramid, "INFERENCE_GROUP_BYTES", 1)
    x = torch.zeros(4, 16, 12, 10)
    assert inference_group_size(model.stages[0], x) is None  # gradients enabled: autograd sees one batch
    with torch.no_grad():
        assert inference_group_size(model.stages[0], x) == 1
        assert inference_group_size(model.stages[0], x[:1]) is None
        with biformer.attention_backend("reference"):  # the baseline keeps the authors' data flow
            assert inference_group_size(model.stages[0], x) is None
