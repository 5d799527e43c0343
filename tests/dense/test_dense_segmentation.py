"""Semantic FPN and UperNet on BiFormer: shapes at odd sizes, gradients, overfitting one batch, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dense_helpers import TINY, generated_crops

from biformer.dense import (
    SceneDataset,
    SemanticFPNHead,
    UperNetHead,
    semantic_fpn_biformer,
    semantic_fpn_biformer_tiny,
    upernet_biformer,
)

BUILDERS = {"semantic_fpn": semantic_fpn_biformer, "upernet": upernet_biformer}
SMALL_HEADS = {"semantic_fpn": dict(fpn_channels=32, channels=32), "upernet": dict(channels=32)}


def build(name: str, num_classes: int = 4):
    return BUILDERS[name](TINY, num_classes, backbone_options=dict(n_win=2), head_options=SMALL_HEADS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("size", [(45, 71), (64, 64)])
def test_logits_at_input_size(name, size):
    model = build(name).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, *size)).shape == (2, 4, *size)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_parameter_gets_a_gradient(name):
    model = build(name)
    F.cross_entropy(model(torch.rand(2, 3, 37, 50)), torch.randint(0, 4, (2, 37, 50))).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loss_falls_when_overfitting_one_batch(name):
    crops, labels = generated_crops()
    images, masks = zip(*(SceneDataset(crops, labels, 2, task="segmentation", image_size=40)[i] for i in range(2)))
    images, masks = torch.stack(images), torch.stack(masks)
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def test_semantic_fpn_branch_depths_follow_the_paper():
    head = SemanticFPNHead([8, 8, 8, 8], num_classes=3, fpn_channels=8, channels=8)
    assert [len(steps) for steps in head.scale_heads] == [1, 1, 2, 3]


def test_named_builder_uses_the_variant():
    model = semantic_fpn_biformer_tiny(num_classes=5)
    assert model.backbone.channels == [64, 128, 256, 512] and model.head.classifier.out_channels == 5
    assert model.backbone.bra_layers()[0].n_win == 8  # the authors' ADE20K setting


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="in_channels"):
        SemanticFPNHead([8, 8, 8], num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        UperNetHead([8, 8, 8, 8], num_classes=0)
    with pytest.raises(ValueError, match="channels"):
        UperNetHead([8, 8, 8, 8], num_classes=3, channels=0)
    with pytest.raises(ValueError, match="out_indices"):
        semantic_fpn_biformer(TINY, 3, backbone_options=dict(n_win=2, out_indices=(1, 2, 3)))
    with pytest.raises(ValueError, match="expected 3 channels"):
        build("upernet")(torch.rand(1, 4, 32, 32))
