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
    ["grad", "float64", "bfloat16", "autocast training", "float16 autocast", "autocast inference-mode weights",
     "autocast float64", "subclass", "hook", "pre_hook", "global_hook", "traced", "off"],
)
def test_other_calls_are_exactly_the_layers_own(monkeypatch, case):
    monkeypatch.setenv(L.ENV_VARIABLE, "0" if case == "off" else "1")
    torch.manual_seed(0)
    layer, x = _plain_cases()
    grad = case in ("grad", "autocast training")
    autocast = case.startswith("autocast") or case == "float16 autocast"
    autocast_dtype = torch.float16 if case == "float16 autocast" else torch.bfloat16
    if case == "autocast inference-mode weights":
        with torch.inference_mode():
            layer = nn.Linear(8, 8)
    if case == "autocast float64":
        x = x.double()
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
        with torch.set_grad_enabled(grad), torch.autocast("cpu", autocast_dtype, enabled=autocast):
            if case == "traced":
                wrapper = nn.Module()
                wrapper.layer = layer
                wrapper.forward = lambda t: L.linear(t, wrapper.layer)
                with torch.no_grad():  # outside tracing, this call takes the path on a CPU where it is on
                    graph = str(torch.jit.trace(wrapper, x, check_trace=False).inlined_graph)
                assert "aten::linear" in graph and "mkldnn" not in graph
                return
            assert not L.takes_onednn_path(x, layer)
            if case == "autocast float64":  # autocast leaves float64 alone: the layer's own error, unchanged
                with pytest.raises(RuntimeError) as ours:
                    L.linear(x, layer, "gelu")
                with pytest.raises(RuntimeError) as theirs:
                    layer(x)
                assert str(ours.value) == str(theirs.value)
                return
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


# --- CPU bfloat16 autocast inference: the same fused GEMM on kept bfloat16 weights ---------------------------
def _bf16_gemm_runs() -> bool:
    """Whether oneDNN runs a bfloat16 linear here at all (natively or emulated): the path's results are then
    tested on any CPU, with its native-bf16 check (``_bf16_available``) forced on."""
    if not L._available():
        return False
    try:
        L._pointwise(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16), None,
                     "none", [], "")
    except RuntimeError:
        return False
    return True


needs_bf16_gemm = pytest.mark.skipif(not _bf16_gemm_runs(), reason="oneDNN runs no bfloat16 linear here")


@pytest.fixture
def bf16_on(monkeypatch):
    monkeypatch.setenv(L.ENV_VARIABLE, "1")
    monkeypatch.setattr(L, "_bf16_available", lambda: True)
    L.clear_kept_weights()
    yield
    L.clear_kept_weights()


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@needs_bf16_gemm
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_bf16_autocast_path_matches_float64_and_autocast(bf16_on, input_dtype, bias, activation):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    x = torch.randn(2, 7, 48).to(input_dtype)
    with torch.no_grad(), bf16_autocast():
        assert L.takes_onednn_path(x, layer)
        out = L.linear(x, layer, activation)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(L.ENV_VARIABLE, "0")
            theirs = L.linear(x, layer, activation)  # autocast's own call
    assert out.dtype == theirs.dtype == torch.bfloat16 and out.shape == (2, 7, 40)
    # the float64 reference on the bfloat16 operands autocast computes with
    rounded = nn.Linear(48, 40, bias=bias).double()
    with torch.no_grad():
        rounded.weight.copy_(layer.weight.bfloat16())
        if bias:
            rounded.bias.copy_(layer.bias.bfloat16())
    expected = reference(x.bfloat16(), rounded, activation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)  # one bfloat16 rounding
    torch.testing.assert_close(out.double(), theirs.double(), rtol=2e-2, atol=2e-2)


@needs_bf16_gemm
def test_kept_bf16_weight_is_made_once_and_follows_every_change(bf16_on):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16)

    def check() -> torch.Tensor:
        with torch.no_grad(), bf16_autocast():
            got = L.linear(x, layer)
            expected = F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        return L._KEPT[layer.weight][2]

    first = check()
    assert check() is first  # the same kept tensor while nothing changed
    changes = [
        lambda: layer.weight.mul_(-2.0),  # in place: a new version
        lambda: setattr(layer.weight, "data", torch.randn(8, 16)),  # new data, the same Parameter
        lambda: setattr(layer, "weight", nn.Parameter(torch.randn(8, 16))),  # another Parameter
        lambda: layer.bias.add_(3.0),  # the bias alone
        lambda: setattr(layer, "bias", nn.Parameter(torch.randn(8))),
        lambda: layer.load_state_dict(nn.Linear(16, 8).state_dict()),
    ]
    for change in changes:
        kept = check()
        with torch.no_grad():
            change()
        assert check() is not kept


@needs_bf16_gemm
def test_kept_weights_go_with_the_layer_and_are_never_copied(bf16_on):
    import copy
    import gc
    import pickle

    layer = nn.Linear(16, 8)
    with torch.no_grad(), bf16_autocast():
        L.linear(torch.randn(3, 16), layer)
    assert len(L._KEPT) == 1
    other = copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))
    assert other.weight not in L._KEPT and len(L._KEPT) == 1  # nothing of it in the copies
    del layer
    gc.collect()
    assert len(L._KEPT) == 0  # freed with its layer
    with torch.no_grad(), bf16_autocast():
        L.linear(torch.randn(3, 16), other)
    L.clear_kept_weights()
    assert len(L._KEPT) == 0


def test_bf16_autocast_without_native_bf16_keeps_autocasts_call(monkeypatch):
    monkeypatch.setenv(L.ENV_VARIABLE, "1")
    monkeypatch.setattr(L, "_bf16_available", lambda: False)
    with torch.no_grad(), bf16_autocast():
        assert not L.takes_onednn_path(torch.randn(2, 8), nn.Linear(8, 8))


@needs_bf16_gemm
def test_model_forward_under_bf16_autocast_with_and_without_the_path(bf16_on, monkeypatch):
    """biformer_nano under bf16 autocast: the kept-weight GEMMs give autocast's logits to bfloat16 rounding and
    predict the same classes."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    real = L._pointwise
    monkeypatch.setattr(L, "_pointwise", lambda *args: calls.append(args[1].dtype) or real(*args))
    with torch.no_grad():
        monkeypatch.setenv(L.ENV_VARIABLE, "0")
        with bf16_autocast():
            plain = model(x)
        monkeypatch.setenv(L.ENV_VARIABLE, "1")
        with bf16_autocast():
            fused = model(x)
        reference64 = model.double()(x.double())
    assert calls and set(calls) == {torch.bfloat16}
    # both runs are one bfloat16 computation of the same network: equally far from float64
    error_fused = (fused.double() - reference64).abs().max()
    error_plain = (plain.double() - reference64).abs().max()
    assert error_fused <= 2 * error_plain + 1e-2
    torch.testing.assert_close(fused.float(), plain.float(), rtol=5e-2, atol=5e-2)


@needs_bf16_gemm
def test_clear_kept_weights_frees_the_entries_of_a_converted_model(bf16_on):
    layer = nn.Linear(16, 8)
    with torch.no_grad(), bf16_autocast():
        L.linear(torch.randn(3, 16), layer)
    layer.bfloat16()  # the same Parameter objects, now bfloat16: the path no longer applies
    with torch.no_grad(), bf16_autocast():
        assert not L.takes_onednn_path(torch.randn(3, 16), layer)
    assert layer.weight in L._KEPT
    L.clear_kept_weights()
    assert layer.weight not in L._KEPT
