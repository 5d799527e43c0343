"""The downsampling conv: the plain conv's values (bit-identical where it keeps a channels-last weight), its
gradients, a kept weight that follows every change of the parameter, and nn.Conv2d's state_dict."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer  # noqa: F401  (registers the models)
from biformer.layers.downsample_conv import LARGE_WEIGHT_ELEMENTS, DownsampleConv2d

IN, OUT = 256, 512  # biformer_small's last downsampling: 1.18 M weight elements, above the threshold


def large_conv(seed: int = 0) -> DownsampleConv2d:
    torch.manual_seed(seed)
    conv = DownsampleConv2d(IN, OUT, kernel_size=3, stride=2, padding=1)
    assert conv.weight.numel() >= LARGE_WEIGHT_ELEMENTS
    return conv


def image(batch: int = 2, size: int = 9, channels: int = IN) -> torch.Tensor:
    return torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)


def plain(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def test_state_dict_and_parameters_are_nn_conv2d():
    conv = large_conv()
    reference = nn.Conv2d(IN, OUT, kernel_size=3, stride=2, padding=1)
    assert conv.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(conv.state_dict())
    assert conv.weight.is_contiguous()  # safetensors saves only contiguous tensors


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_inference_keeps_a_channels_last_weight_and_is_bit_identical(no_grad):
    conv, x = large_conv(), image()
    with no_grad():
        assert conv.path(x) == "kept"
        first = conv(x)
        kept = conv._kept[-1]
        assert kept.is_contiguous(memory_format=torch.channels_last)
        second = conv(x)
        assert conv._kept[-1] is kept  # made once
        assert torch.equal(first, plain(conv, x)) and torch.equal(second, first)


def test_inference_under_bf16_autocast_is_autocasts_conv():
    conv, x = large_conv(), image()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = conv(x), plain(conv, x)
        assert conv._kept[-1].dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16])
def test_a_lower_precision_input_under_bf16_autocast_keeps_the_weight(input_dtype):
    # biformer_small's last downsampling sees a bfloat16 map under autocast: without the kept weight the conv
    # would copy its 4.5 MiB weight into channels-last memory on every call
    conv, x = large_conv(), image().to(input_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.path(x) == "kept"
        got, expected = conv(x), plain(conv, x)
        kept = conv._kept[-1]
        assert kept.dtype == torch.bfloat16 and kept.is_contiguous(memory_format=torch.channels_last)
        conv(x)
        assert conv._kept[-1] is kept
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_kept_weight_follows_in_place_updates_new_data_and_replacement():
    conv, x = large_conv(), image()
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)  # an in-place update: a new version of the same tensor
        assert torch.equal(conv(x), plain(conv, x))
        conv.weight.data = torch.randn_like(conv.weight)  # new data under the same Parameter
        assert torch.equal(conv(x), plain(conv, x))
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))  # another Parameter
        assert torch.equal(conv(x), plain(conv, x))
        conv.load_state_dict(large_conv(seed=1).state_dict())
        assert torch.equal(conv(x), plain(conv, x))


def test_dtype_change_drops_the_kept_weight():
    conv, x = large_conv(), image()
    with torch.no_grad():
        conv(x)
        assert conv._kept is not None
        conv.double()
        assert conv._kept is None
        x64 = x.double()
        assert torch.equal(conv(x64), plain(conv, x64))
        assert conv._kept[-1].dtype == torch.float64


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_the_kept_weight_is_not_copied_or_saved(how):
    conv, x = large_conv(), image()
    with torch.no_grad():
        conv(x)
    if how == "deepcopy":
        other = copy.deepcopy(conv)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(conv))
    else:
        buffer = io.BytesIO()
        torch.save(conv, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)  # our own module, written just above
    assert other._kept is None and conv._kept is not None
    with torch.no_grad():
        assert torch.equal(other(x), plain(conv, x))


def test_training_runs_nchw_with_the_plain_convs_gradients():
    conv, x = large_conv(), image().requires_grad_()
    assert conv.path(x) == "nchw"
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (x, conv.weight, conv.bias), grad))
    x64 = x.detach().double().requires_grad_()
    w64, b64 = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    out64 = F.conv2d(x64, w64, b64, 2, 1)
    expected = (out64, *torch.autograd.grad(out64, (x64, w64, b64), grad.double()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)
    assert conv._kept is None  # training keeps nothing


def test_frozen_weight_with_gradients_enabled_keeps_the_weight():
    conv, x = large_conv(), image()
    conv.requires_grad_(False)
    assert conv.path(x) == "kept"
    assert torch.equal(conv(x), plain(conv, x))


def test_float64_under_bf16_autocast_stays_float64_as_nn_conv2d():
    conv, x = large_conv().double(), image().double()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.path(x) == "plain"
        got, expected = conv(x), plain(conv, x)
    assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_a_model_built_under_inference_mode_runs_the_plain_conv():
    with torch.inference_mode():
        conv, x = large_conv(), image()
        assert conv.weight.is_inference() and conv.path(x) == "plain"
        assert torch.equal(conv(x), plain(conv, x)) and conv._kept is None


@pytest.mark.parametrize(
    "case",
    ["small weight", "NCHW input", "bf16 training", "float64 training", "traced"],
)
def test_other_cases_run_the_plain_conv(case):
    conv, x = large_conv(), image()
    if case == "small weight":
        conv = DownsampleConv2d(8, 16, kernel_size=3, stride=2, padding=1)
        x = image(channels=8)
    elif case == "NCHW input":
        x = x.contiguous()
    elif case == "float64 training":
        conv, x = conv.double(), x.double().requires_grad_()
    elif case == "bf16 training":
        x = x.requires_grad_()
    if case == "bf16 training":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv.path(x) == "plain"
            assert torch.equal(conv(x), plain(conv, x))
    elif case == "traced":
        with torch.no_grad():
            traced = torch.jit.trace(conv, x, check_trace=False)  # no eager re-run
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert "aten::_convolution" in kinds and "aten::contiguous" not in kinds and conv._kept is None
        with torch.no_grad():
            assert torch.equal(traced(x), plain(conv, x))
    else:
        assert conv.path(x) == "plain"
        assert torch.equal(conv(x), plain(conv, x))
    assert conv._kept is None


def test_biformer_small_uses_it_for_the_last_downsampling_only():
    import timm

    model = timm.create_model("biformer_small")
    convs = [layer[0] for layer in model.downsample_layers[1:]]
    assert all(isinstance(conv, DownsampleConv2d) for conv in convs)
    large = [conv.weight.numel() >= LARGE_WEIGHT_ELEMENTS for conv in convs]
    assert large == [False, False, True]
