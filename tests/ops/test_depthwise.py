"""The depth-wise conv with the CPU training backward: the same values and gradients as the plain conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from biformer.layers.depthwise import DepthwiseConv2d
from biformer.ops.depthwise import DepthwiseConv2dFunction, depthwise_conv2d, uses_fast_backward


def plain_float64(x, weight, bias, grad):
    """Forward and gradients of the plain depth-wise conv in float64 (the oracle)."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    out = F.conv2d(x64, w64, b64, padding=weight.shape[-1] // 2, groups=weight.shape[0])
    return (out, *torch.autograd.grad(out, (x64, w64, b64), grad.double()))


@pytest.mark.parametrize("kernel", [5, 7])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_fast_backward_matches_float64(kernel, layout):
    torch.manual_seed(kernel)
    batch, channels, height, width = 2, 6, 7, 9
    if layout == "channel_slice":  # the LCE conv's input: V as a channel slice of an NHWC projection
        x = torch.randn(batch, height, width, 2 * channels)[..., channels:].permute(0, 3, 1, 2)
    else:
        x = torch.randn(batch, channels, height, width)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    weight = torch.randn(channels, 1, kernel, kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    assert uses_fast_backward(x, weight)
    out = DepthwiseConv2dFunction.apply(x, weight, bias)
    grad = torch.randn_like(out)
    actual = (out, *torch.autograd.grad(out, (x, weight, bias), grad))
    for got, expected in zip(actual, plain_float64(x, weight, bias, grad)):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_input_only_and_weight_only_gradients():
    x = torch.randn(1, 4, 5, 5)
    weight, bias = torch.randn(4, 1, 5, 5), torch.randn(4)
    expected = plain_float64(x, weight, bias, torch.ones(1, 4, 5, 5))
    grad_x = torch.autograd.grad(depthwise_conv2d(x.requires_grad_(), weight, bias).sum(), x)[0]
    torch.testing.assert_close(grad_x.double(), expected[1], atol=1e-4, rtol=1e-4)
    weight.requires_grad_()
    grad_w = torch.autograd.grad(depthwise_conv2d(x.detach(), weight, bias).sum(), weight)[0]
    torch.testing.assert_close(grad_w.double(), expected[2], atol=1e-4, rtol=1e-4)


def test_plain_conv_outside_float32_training():
    x, weight = torch.randn(1, 2, 6, 6, requires_grad=True), torch.randn(2, 1, 5, 5)
    assert not uses_fast_backward(x.detach(), weight)  # no gradients
    assert not uses_fast_backward(x.double(), weight.double())
    assert not uses_fast_backward(x, torch.randn(2, 1, 6, 6))  # even kernel: not the 'same' conv
    assert not uses_fast_backward(x, torch.randn(2, 1, 3, 3))  # 3x3: oneDNN's backward is as fast
    with torch.autocast("cpu", dtype=torch.float16):
        assert not uses_fast_backward(x, weight)


@pytest.mark.parametrize("kernel", [5, 7])
def test_bfloat16_autocast_matches_the_plain_autocast_conv(kernel):
    """Under CPU bf16 autocast: the values and gradients of autocast's own conv, within bf16 rounding."""
    torch.manual_seed(kernel)
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 1, kernel, kernel, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    grad = torch.randn(2, 6, 7, 7)
    results = []
    for conv in (depthwise_conv2d, lambda x, w, b: F.conv2d(x, w, b, padding=kernel // 2, groups=6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv is not depthwise_conv2d or uses_fast_backward(x, weight)
            out = conv(x, weight, bias)
        assert out.dtype == torch.bfloat16
        results.append((out, *torch.autograd.grad(out, (x, weight, bias), grad.bfloat16())))
    expected64 = plain_float64(x, weight, bias, grad)
    for ours, plain, exact in zip(*results, expected64):
        assert ours.dtype == plain.dtype  # fp32 gradients for the fp32 leaves, as autocast gives
        scale = exact.abs().max().item()
        torch.testing.assert_close(ours.double(), exact, atol=2e-2 * scale, rtol=2e-2)
        torch.testing.assert_close(ours.double(), plain.double(), atol=2e-2 * scale, rtol=2e-2)


def test_module_keeps_conv2d_parameters_and_outputs():
    torch.manual_seed(0)
    layer = DepthwiseConv2d(8, 5)
    plain = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    assert isinstance(layer, nn.Conv2d)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), plain(x))
