"""Models reject bad inputs and unsupported options with clear errors."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("biformer_tiny", num_classes=3).eval()


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 32, 32), "4-D"),
        (torch.randn(1, 1, 32, 32), "3 channels"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
        (torch.randn(0, 3, 32, 32), "non-empty"),
    ],
)
def test_bad_model_inputs(tiny, x, message):
    with pytest.raises(ValueError, match=message):
        tiny(x)


def test_stl_needs_32_pixels():
    model = timm.create_model("biformer_stl", num_classes=3)
    with pytest.raises(ValueError, match=">= 32"):
        model(torch.randn(1, 3, 16, 64))


def test_without_auto_pad_a_non_divisible_size_names_the_fix():
    model = biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], num_classes=2, auto_pad=False)
    with pytest.raises(ValueError, match="auto_pad=True"):
        model(torch.randn(1, 3, 200, 200))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(kv_downsample_mode="ada_avgpool"), NotImplementedError, "kv_downsample_mode"),
        (dict(param_routing=True), NotImplementedError, "param_routing"),
        (dict(pe="sum"), NotImplementedError, "pe"),
        (dict(mlp_dwconv=True), NotImplementedError, "mlp_dwconv"),
        (dict(representation_size=128), NotImplementedError, "representation_size"),
        (dict(topks=[1, 4, 0, -2]), NotImplementedError, "topks"),
        (dict(depth=[2, 2, 2]), ValueError, "depth"),
        (dict(in_chans=0), ValueError, "in_chans"),
        (dict(topks=[1, 4, 50, -2]), ValueError, "topk"),
        (dict(region_sizes=[8, 4]), ValueError, "region_sizes"),
    ],
)
def test_bad_constructor_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        biformer.BiFormer(**kwargs)


def test_stl_norm_layer_names():
    model = biformer.BiFormerSTL(depth=[1, 1, 1, 1], embed_dim=[32, 32, 32, 32], norm_layer="torch.nn.BatchNorm2d")
    assert isinstance(model.norm, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm_layer"):
        biformer.BiFormerSTL(norm_layer="os.system")


def test_reference_options_that_are_implemented():
    model = biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], num_classes=2,
                              layer_scale_init_value=1e-2, pre_norm=False, topks=[1, 4, 16, -1],
                              before_attn_dwconv=5, auto_pad=True)
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2)
    assert "stages.0.0.gamma1" in dict(model.named_parameters())


def test_region_sizes_reach_every_bra():
    model = biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], num_classes=2,
                              region_sizes=[8, 4, 2, None])
    assert [model.stages[i][0].attn.region_size for i in range(3)] == [8, 4, 2]
    with biformer.record_routing(model) as routing:
        model(torch.randn(1, 3, 128, 96))
    assert routing["stages.0.0.attn"].shape == (1, 4 * 3, 1)  # 32x24 map, regions of 8x8


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_without_crashing(tiny, value):
    """No check on every forward (it would cost a device sync): NaN/inf flow through to the output as NaN,
    never into an index error inside the routing. Training stops on a non-finite loss instead."""
    x = torch.randn(1, 3, 64, 64)
    x[0, :, 10, 10] = value
    with torch.no_grad():
        out = tiny(x)
    assert out.shape == (1, 3)
    assert not torch.isfinite(out).all()


def test_record_routing_sees_the_whole_batch_without_gradients():
    model = biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], num_classes=2, auto_pad=True).eval()
    with torch.no_grad(), biformer.record_routing(model) as routing:
        model(torch.randn(4, 3, 288, 288))
    assert routing["stages.0.0.attn"].shape == (4, 49, 1)
