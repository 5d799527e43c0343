"""biformer.ops.linear: oneDNN's fused GEMM for CPU float32 inference, against float64 and nn.Linear."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer  # noqa: F401 (registers the models)
from biformer.ops import linear as L

needs_onednn = pytest.mark.skipif(not L._available(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_on(monkeypatch):
    monkeypatch.setenv(L.ENV_VARIABLE, "1")


def reference(x: torch.Tensor, layer: nn.Linear, activation: str | None) -> torch.Tensor:
    """The same layer in float64: x @ W^T + b, then the exact (erf) GELU."""
    out = x.double() @ layer.weight.double().t()
    if layer.bias is not None:
        out = out + layer.bias.double()
    return F.gelu(out) if activation == "gelu" else out


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 6, 24), (1, 56, 56, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_onednn_path_matches_float64(onednn_on, shape, bias, activation):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        assert L.takes_onednn_path(x, layer)
        out = L.linear(x, layer, activation)
    assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, layer, activation), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_non_contiguous_input_is_made_contiguous(onednn_on):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 4, 32)[..., ::2]  # a strided channel view
    with torch.no_grad():
        torch.testing.assert_close(L.linear(x, layer).double(), reference(x, layer, None), rtol=1e-5, atol=1e-5)


def _plain_cases():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    return layer, x


@pytest.mark.parametrize(
    "case",
    ["grad", "float64", "bfloat16", "autocast", "subclass", "hook", "pre_hook", "global_hook", "traced", "off"],
)
def test_other_calls_are_exactly_the_layers_own(monkeypatch, case):
    monkeypatch.setenv(L.ENV_VARIABLE, "0" if case == "off" else "1")
    torch.manual_seed(0)
    layer, x = _plain_cases()
    grad = case == "grad"
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "bfloat16":
        layer, x = layer.bfloat16(), x.bfloat16()
    if case == "subclass":
        layer.__class__ = type("MyLinear", (nn.Linear,), {})
    seen = []
    if case == "hook":
        layer.register_forward_hook(lambda module, args, out: seen.append("hook"))
    if case == "pre_hook":
        layer.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    handle = None
    if case == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append("global"))
    try:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
            if case == "traced":
                wrapper = nn.Module()
                wrapper.layer = layer
                wrapper.forward = lambda t: L.linear(t, wrapper.layer)
                with torch.no_grad():  # outside tracing, this call takes the path on a CPU where it is on
                    graph = str(torch.jit.trace(wrapper, x, check_trace=False).inlined_graph)
                assert "aten::linear" in graph and "mkldnn" not in graph
                return
            assert not L.takes_onednn_path(x, layer)
            out = L.linear(x, layer, "gelu")
            expected = F.gelu(layer(x))
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(out, expected)
    if case in ("hook", "pre_hook", "global_hook"):
        assert seen  # the hook ran on linear()'s call
    if grad:
        assert out.requires_grad


def test_layers_of_mismatched_features_keep_their_call(onednn_on):
    layer = nn.Linear(8, 4)
    assert not L.takes_onednn_path(torch.randn(2, 6), layer)
    assert not L.takes_onednn_path(torch.randn(2, 8), layer, nn.Linear(5, 2))  # the chain's second input is 4 wide


@pytest.mark.parametrize("value", ["yes", "2", "on", " 1"])
def test_bad_environment_value_is_one_line(monkeypatch, value):
    monkeypatch.setenv(L.ENV_VARIABLE, value)
    expected = rf"^{L.ENV_VARIABLE}: expected 0 \(off\), 1 \(on\) or unset .* got '{value}'$"
    with pytest.raises(ValueError, match=expected):
        L.onednn_linear_enabled()


def test_bad_activation_is_one_line():
    with pytest.raises(ValueError, match=r"^activation: expected one of \(None, 'gelu'\), got 'relu'$"):
        L.linear(torch.randn(2, 8), nn.Linear(8, 8), "relu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n", True),
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n", False),  # AVX2 only: not measured faster
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f amx_bf16\n", False),
        ("processor\t: 0\n", False),
    ],
)
def test_cpu_rule_from_a_written_cpuinfo(text, expected):
    assert L.cpu_prefers_onednn(text) is expected


def test_unset_follows_the_cpu_rule(monkeypatch):
    monkeypatch.delenv(L.ENV_VARIABLE, raising=False)
    monkeypatch.setattr(L, "_machine_prefers_onednn", lambda: True)
    assert L.onednn_linear_enabled()
    monkeypatch.setattr(L, "_machine_prefers_onednn", lambda: False)
    assert not L.onednn_linear_enabled()


@needs_onednn
def test_model_forward_with_and_without_the_path(monkeypatch):
    """biformer_nano in inference: oneDNN's linears give nn.Linear's logits to float rounding, and the training
    forward (gradients) never takes the path."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(L, "_pointwise", lambda *args: calls.append(1) or real(*args), raising=False)
    with torch.no_grad():
        monkeypatch.setenv(L.ENV_VARIABLE, "0")
        plain = model(x)
        monkeypatch.setenv(L.ENV_VARIABLE, "1")
        fused = model(x)
    assert calls, "the model's inference took the oneDNN path"
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.train()
    model(x).sum().backward()
    assert not calls
