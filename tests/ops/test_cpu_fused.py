"""The fused CPU kernels (``cpu_fused``, :mod:`biformer.ops.cpu_kernels`) against float64 formulations: forward and
backward, float32 and bfloat16, every layout they read, the BRA layer's fused path, and their fallbacks."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from biformer import BiLevelRoutingAttention
from biformer.ops import attention_backend, select_backend
from biformer.ops import cpu_kernels as kernels
from biformer.ops.backends import get_backend, registry
from biformer.ops.backends.cpu_fused import cpu_fused_attention, kernels_run
from biformer.ops.functional import routed_attention_heads


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels, built once for this module (skipped where the machine has no C++ compiler or ninja)."""
    reason = kernels.missing_tools()
    if reason is not None:
        pytest.skip(f"the fused CPU kernels cannot be built here: {reason}")
    assert kernels.kernels_available(), "the kernels did not build although the tools are there"


def plain_heads(query, key, value, topk_index, scale):
    """Routed attention on head-major tensors, a loop in float64."""
    heads, batch, regions, q_len, _ = query.shape
    out = torch.empty(heads, batch, regions, q_len, value.shape[-1], dtype=torch.float64)
    for n in range(batch):
        for r in range(regions):
            routed = topk_index[n, r]
            k = key[:, n, routed].flatten(1, 2).double()  # (heads, topk * L, d)
            v = value[:, n, routed].flatten(1, 2).double()
            weights = torch.softmax(query[:, n, r].double() * scale @ k.transpose(1, 2), dim=-1)
            out[:, n, r] = weights @ v
    return out


def random_routing(batch, regions, topk):
    return torch.stack([torch.stack([torch.randperm(regions)[:topk] for _ in range(regions)])
                        for _ in range(batch)])


# heads, batch, regions, tokens, qk head size, v head size, topk
SHAPES = [
    (2, 2, 49, 64, 32, 32, 1),  # biformer's stage 1 at 224 px: regions of whole vectors (the direct path)
    (4, 1, 49, 16, 32, 32, 4),  # stage 2
    (8, 2, 49, 4, 32, 32, 16),  # stage 3: regions smaller than a vector (the assembled path)
    (3, 2, 6, 5, 7, 9, 3),  # odd sizes everywhere, qk and v head sizes differ
    (1, 1, 4, 1, 3, 17, 4),  # one token per region, every region routed
    (2, 3, 9, 36, 20, 33, 2),
]
# float32: float rounding; bfloat16: the inputs rounded to bfloat16, float32 arithmetic, the result rounded once
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(params=["float32", "bfloat16", "bfloat16-float32-products"])
def dtype(request):
    """float32; bfloat16 with the dot-product kernels where the CPU has AVX512-BF16 (else the float32 products);
    bfloat16 with the float32 products in any case."""
    if request.param == "float32":
        yield torch.float32
        return
    dot = request.param == "bfloat16"
    compiled = torch.ops.biformer_cpu.set_bf16_dot_products(dot)
    if not dot and not compiled:
        torch.ops.biformer_cpu.set_bf16_dot_products(True)
        pytest.skip("this CPU's kernels have no dot-product form: the bfloat16 case runs the float32 products")
    yield torch.bfloat16
    torch.ops.biformer_cpu.set_bf16_dot_products(True)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64(shape, dtype):
    heads, batch, regions, tokens, d_qk, d_v, topk = shape
    query, key = (torch.randn(heads, batch, regions, tokens, d_qk).to(dtype) for _ in range(2))
    value = torch.randn(heads, batch, regions, tokens, d_v).to(dtype)
    topk_index = random_routing(batch, regions, topk)
    grad = torch.randn(heads, batch, regions, tokens, d_v).to(dtype)
    inputs = [t.requires_grad_() for t in (query, key, value)]
    out = cpu_fused_attention(*inputs, topk_index, scale=0.3)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = plain_heads(*exact, topk_index, 0.3)
    expected.backward(grad.double())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    for actual, reference in zip(inputs, exact):
        assert actual.grad.dtype == dtype
        torch.testing.assert_close(actual.grad.double(), reference.grad, **TOLERANCE[dtype])


def test_keys_never_routed_get_zero_gradients_and_the_backward_is_deterministic():
    query, key, value = (torch.randn(2, 1, 9, 4, 8, requires_grad=True) for _ in range(3))
    topk_index = torch.tensor([[[0, 1]] * 9])  # only regions 0 and 1 are ever routed
    grads = []
    for _ in range(2):
        out = cpu_fused_attention(query, key, value, topk_index, scale=0.5)
        grads.append(torch.autograd.grad(out.square().sum(), (query, key, value)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)  # bit-identical: fixed summation order, no atomics
    assert grads[0][1][:, :, 2:].abs().sum() == 0 and grads[0][2][:, :, 2:].abs().sum() == 0
    assert grads[0][1][:, :, :2].abs().sum() > 0


def test_routed_attention_heads_runs_the_kernels_on_strided_inputs():
    qkv = torch.randn(3, 2, 2, 9, 4, 8)[:, :, :, :, :, :6]  # non-contiguous last-axis slices of a larger tensor
    query, key, value = qkv[0], qkv[1], qkv[2]
    topk_index = random_routing(2, 9, 3)
    actual = routed_attention_heads(query, key, value, topk_index, scale=0.4, backend="cpu_fused")
    torch.testing.assert_close(actual.double(), plain_heads(query, key, value, topk_index, 0.4), atol=2e-5, rtol=1e-4)


def test_image_entry_adds_the_map_and_writes_the_log_sum_exp(dtype):
    batch, height, width, heads, head_dim, grid = 2, 8, 12, 2, 8, (2, 3)
    qkv = torch.randn(batch, height, width, 3 * heads * head_dim).to(dtype)
    add_to = torch.randn(batch, height, width, heads * head_dim).to(dtype)
    topk_index = random_routing(batch, 6, 2)
    out, lse = torch.ops.biformer_cpu.image_attention_forward(qkv, topk_index, *grid, heads, heads * head_dim, 0.25,
                                                              add_to, True)

    def heads_of(part):  # (N, H, W, C) -> (heads, N, R, L, d) in float64
        x = part.double().view(batch, grid[0], 4, grid[1], 4, heads, head_dim).permute(5, 0, 1, 3, 2, 4, 6)
        return x.reshape(heads, batch, 6, 16, head_dim)

    query, key, value = (heads_of(p) for p in qkv.split(heads * head_dim, dim=-1))
    expected = plain_heads(query, key, value, topk_index, 0.25)  # (heads, N, R, L, d)
    expected_image = expected.view(heads, batch, *grid, 4, 4, head_dim).permute(1, 2, 4, 3, 5, 0, 6)
    expected_image = expected_image.reshape(batch, height, width, heads * head_dim) + add_to.double()
    torch.testing.assert_close(out.double(), expected_image, **TOLERANCE[dtype])
    scores = torch.einsum("hnrld,hnrkd->hnrlk", query, torch.stack(
        [key[:, n, topk_index[n]].flatten(2, 3) for n in range(batch)], dim=1)) * 0.25
    expected_lse = scores.logsumexp(-1).permute(1, 0, 2, 3)  # (N, heads, R, L)
    torch.testing.assert_close(lse.double(), expected_lse, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_routing_pass_matches_float64(dtype):
    from biformer.ops.routing import route_projection

    qkv = torch.randn(2, 14, 21, 3 * 32).to(dtype)
    logits = torch.ops.biformer_cpu.region_logits(qkv, 7, 7, 32, 0.2)
    means = qkv[..., :64].double().view(2, 7, 2, 7, 3, 64).mean((2, 4)).reshape(2, 49, 64)
    expected = means[..., :32] @ means[..., 32:].transpose(1, 2) * 0.2
    assert logits.shape == (2, 49, 49) and logits.dtype == torch.float32  # float32 whatever the input
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
    expected_index = torch.topk(expected, 5, dim=-1).indices
    assert torch.equal(route_projection(qkv, 7, 7, 32, 5, 0.2), expected_index)


# --- the BRA layer ---------------------------------------------------------------------------------------------
LAYER_CASES = [
    dict(dim=64, num_heads=2, n_win=7, topk=1, size=(56, 56)),  # biformer's stage 1 shape
    dict(dim=64, num_heads=2, n_win=7, topk=16, size=(14, 14)),  # stage 3's region size
    dict(dim=48, num_heads=3, n_win=3, topk=4, size=(10, 13), qk_dim=24),  # auto_pad, qk_dim != dim
]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_matches_the_reference_backend_forward_and_backward(case):
    case = dict(case)
    height, width = case.pop("size")
    layer = BiLevelRoutingAttention(**case, side_dwconv=5, auto_pad=True).double()
    x = torch.randn(2, height, width, case["dim"], dtype=torch.float64)
    layer.backend = "reference"
    x_ref = x.clone().requires_grad_()
    expected, expected_index = layer(x_ref, return_routing=True)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.float().backend = "cpu_fused"
    x_fused = x.float().requires_grad_()
    actual, index = layer(x_fused, return_routing=True)
    assert layer.backend_for(x_fused) == "cpu_fused"
    assert torch.equal(index.sort(-1).values, expected_index.sort(-1).values)
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)
    actual.square().sum().backward()
    torch.testing.assert_close(x_fused.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)
    for param, grad in zip(layer.parameters(), expected_grads):
        torch.testing.assert_close(param.grad.double(), grad, atol=2e-4, rtol=1e-4)


def test_layer_under_bf16_autocast_is_as_close_to_float64_as_the_gather_backend():
    # Routing near-ties flip either way from one draw to the next (bf16 projections), so the errors are averaged
    # over a dozen layers and inputs (cpu_fused routes on float32 affinities, gather on bf16 ones).
    errors = {"gather": [], "cpu_fused": []}
    for seed in range(12):
        torch.manual_seed(seed)
        layer = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4, side_dwconv=5)
        x = torch.randn(2, 28, 28, 64)
        with torch.no_grad():
            expected = layer.double()(x.double())
            layer.float()
            for backend in errors:
                layer.backend = backend
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    actual = layer(x)
                assert actual.dtype == torch.bfloat16
                errors[backend].append(((actual.double() - expected).norm() / expected.norm()).item())
    mean = {backend: sum(values) / len(values) for backend, values in errors.items()}
    # the projections' bf16 rounding dominates; the kernels' float32 arithmetic adds none of its own
    assert mean["cpu_fused"] < 0.03 and mean["cpu_fused"] <= 1.1 * mean["gather"], errors


def test_auto_takes_the_kernels_on_cpu_in_float32_and_bfloat16_not_float64():
    sizes = dict(num_regions=49, topk=4, tokens_per_region=16, device=torch.device("cpu"))
    for grad in (False, True):
        assert select_backend(**sizes, needs_grad=grad, dtype=torch.float32) == "cpu_fused"
        assert select_backend(**sizes, needs_grad=grad, dtype=torch.bfloat16) == "cpu_fused"
        assert select_backend(**sizes, needs_grad=grad, dtype=torch.float64) == "gather"
        assert select_backend(**dict(sizes, device=torch.device("meta")), needs_grad=grad) != "cpu_fused"
    layer = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4)
    assert layer.backend_for(torch.randn(1, 28, 28, 64)) == "cpu_fused"


# --- where the kernels do not run ------------------------------------------------------------------------------
def test_float64_and_other_devices_compute_the_same_function_with_gather():
    query, key, value = (torch.randn(2, 1, 9, 4, 8, dtype=torch.float64) for _ in range(3))
    topk_index = random_routing(1, 9, 3)
    assert not kernels_run(query, key, value)
    assert not kernels_run(query.float(), key.float(), value)  # mixed dtypes
    actual = cpu_fused_attention(query, key, value, topk_index, scale=0.5)
    torch.testing.assert_close(actual, plain_heads(query, key, value, topk_index, 0.5))
    with attention_backend("cpu_fused"):  # the layer takes the head-major path with the fallback
        layer = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2).double()
        x = torch.randn(1, 4, 4, 16, dtype=torch.float64)
        layer.backend = "reference"
        expected = layer(x)
        layer.backend = None
        torch.testing.assert_close(layer(x), expected)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VARIABLE, "0")
    assert not kernels.kernels_available()
    sizes = dict(num_regions=49, topk=4, tokens_per_region=16, device=torch.device("cpu"), needs_grad=False)
    assert select_backend(**sizes, dtype=torch.float32) == "gather"
    query = torch.randn(1, 1, 4, 4, 8)
    assert not kernels_run(query)
    monkeypatch.setenv(kernels.ENV_VARIABLE, "1")
    assert kernels.kernels_available()
    monkeypatch.setenv(kernels.ENV_VARIABLE, "")
    assert kernels.kernels_setting() is None


@pytest.mark.parametrize("value", ["yes", "2", "off", "true"])
def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(kernels.ENV_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"^BIFORMER_CPU_KERNELS: expected 0, 1 or unset, got '{value}'$"):
        kernels.kernels_available()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_load_once", lambda: "no C++ compiler ('nope' is not on PATH)")
    kernels._warn_once.cache_clear()
    monkeypatch.delenv(kernels.ENV_VARIABLE, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.kernels_available()
        assert not kernels.kernels_available()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("biformer: the fused CPU attention kernels could not be built (no C++ compiler")
    sizes = dict(num_regions=49, topk=16, tokens_per_region=4, device=torch.device("cpu"), needs_grad=False)
    assert select_backend(**sizes, dtype=torch.float32) == "dense"
    monkeypatch.setenv(kernels.ENV_VARIABLE, "1")
    with pytest.raises(RuntimeError, match=r"^BIFORMER_CPU_KERNELS=1: the fused CPU kernels could not be built: no"):
        kernels.kernels_available()
    kernels._warn_once.cache_clear()


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert kernels.missing_tools() == "no C++ compiler ('no-such-compiler-here' is not on PATH; set CXX or install g++)"


def test_auto_takes_the_kernels_under_compile_but_not_while_exporting(monkeypatch):
    sizes = dict(num_regions=49, topk=16, tokens_per_region=4, device=torch.device("cpu"), needs_grad=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert select_backend(**sizes, dtype=torch.float32) == "cpu_fused"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert select_backend(**sizes, dtype=torch.float32) == "dense"


@pytest.mark.parametrize("training", [False, True])
def test_compiled_graphs_call_the_kernels_and_match_eager(training):
    import torch._dynamo
    from torch._inductor.compile_fx import compile_fx

    import biformer

    torch._dynamo.reset()
    graphs = []

    def recording_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    torch.manual_seed(0)
    model = biformer.BiFormer(
        depth=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=16, n_win=2,
        topks=[1, 2, 4, -2], mlp_ratios=[2, 2, 2, 2], num_classes=5, side_dwconv=5,
    ).train(training)
    images = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend=recording_inductor, fullgraph=True, dynamic=False)
    with torch.set_grad_enabled(training):
        out = compiled(images)
        expected = model(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    modules = [module for graph in graphs for module in graph.modules() if isinstance(module, torch.fx.GraphModule)]
    targets = {str(node.target) for module in modules for node in module.graph.nodes}  # autograd's bodies too
    assert any("image_attention_forward" in target for target in targets)
    assert any("depthwise_conv" in target for target in targets)  # inference: both convs; training: the 5x5 LCE
    if training:
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected.square().sum().backward()
        for actual, reference in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4)


def test_the_kernels_refuse_out_of_range_indices():
    query = torch.randn(1, 1, 4, 4, 8)
    view = kernels.heads_view(query)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match=r"topk_index: expected values in \[0, 4\), got 4"):
        torch.ops.biformer_cpu.routed_attention_forward(
            view, view, view, torch.tensor([[[4], [0], [1], [2]]]), 1.0, None, kernels.heads_view(out), None
        )


def test_registered_flags():
    backend = get_backend("cpu_fused")
    assert backend.devices == ("cpu",) and backend.dtypes == (torch.float32, torch.bfloat16)
    assert backend.auto and backend.gradients and backend.image_function is not None
    off = dataclasses.replace(backend, available=lambda: False)
    assert not off.admits(num_regions=49, topk=4, tokens_per_region=16, device=torch.device("cpu"), needs_grad=False)
    assert registry._BACKENDS["cpu_fused"] is backend


# --- the depth-wise conv (position encoding, LCE) ---------------------------------------------------------------
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize(("channels", "height", "width"), [(64, 14, 14), (40, 9, 23), (16, 2, 3), (24, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_kernel_matches_float64(kernel, channels, height, width, dtype):
    from biformer.layers.depthwise import DepthwiseConv2d
    from biformer.ops.depthwise import add_depthwise, depthwise_nhwc

    conv = DepthwiseConv2d(channels, kernel)
    x = torch.randn(2, channels + 8, height, width).to(dtype).contiguous(memory_format=torch.channels_last)
    x = x[:, 4 : 4 + channels]  # a channel slice: channels contiguous, not the whole tensor
    expected = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=kernel // 2,
                                          groups=channels)
    with torch.no_grad():
        fused = depthwise_nhwc(x.permute(0, 2, 3, 1), conv)  # (N, H, W, C)
        summed = add_depthwise(x, conv)
    assert fused.dtype == dtype and fused.is_contiguous() and summed.dtype == dtype
    torch.testing.assert_close(fused.permute(0, 3, 1, 2).double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(summed.double(), expected + x.double(), **TOLERANCE[dtype])


def test_depthwise_paths_keep_the_plain_conv_where_the_kernel_does_not_apply():
    from biformer.ops.depthwise import add_depthwise, depthwise_nhwc, plain_depthwise_parts

    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert plain_depthwise_parts(conv) == (conv.weight, conv.bias)
    for other in (torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), torch.nn.Conv2d(8, 8, 3, padding=1),
                  torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                  torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)):
        assert plain_depthwise_parts(other) is None
    calls = []
    conv.register_forward_hook(lambda *args: calls.append(1))
    assert plain_depthwise_parts(conv) is None  # a hook sees its own call
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        add_depthwise(x, conv)
        depthwise_nhwc(x.permute(0, 2, 3, 1), conv)
    assert calls == [1, 1]
    plain = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x.requires_grad_()
    out = add_depthwise(x, plain)  # training: autograd's conv
    assert out.grad_fn is not None and torch.equal(out, x + plain(x))


def test_a_subclass_that_changes_the_forward_keeps_its_own_call():
    from biformer.layers.depthwise import DepthwiseConv2d
    from biformer.ops.depthwise import add_depthwise, plain_depthwise_parts

    class Doubled(DepthwiseConv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    conv = Doubled(16, 3)
    assert plain_depthwise_parts(DepthwiseConv2d(16, 3)) is not None and plain_depthwise_parts(conv) is None
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(add_depthwise(x, conv), x + conv(x))


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_backward_matches_float64(kernel, residual, dtype):
    from biformer.ops.depthwise import FusedDepthwiseConv

    weight, bias = torch.randn(40, 1, kernel, kernel, requires_grad=True), torch.randn(40, requires_grad=True)
    x = torch.randn(2, 9, 11, 40).to(dtype).requires_grad_()  # NHWC
    grad = torch.randn(2, 9, 11, 40).to(dtype)
    out = FusedDepthwiseConv.apply(x, weight, bias, residual)
    out.backward(grad)
    x64 = x.detach().double().permute(0, 3, 1, 2).requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (weight, bias))
    expected = torch.nn.functional.conv2d(x64, w64, b64, padding=kernel // 2, groups=40) + (x64 if residual else 0)
    expected.backward(grad.double().permute(0, 3, 1, 2))
    sums = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)  # over 198 pixels
    torch.testing.assert_close(out.double(), expected.permute(0, 2, 3, 1), **TOLERANCE[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad.permute(0, 2, 3, 1), **TOLERANCE[dtype])
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad.double(), w64.grad, **sums)
    torch.testing.assert_close(bias.grad.double(), b64.grad, **sums)


def test_training_takes_the_kernel_for_float32_kernels_of_5_and_7_only():
    from biformer.layers.depthwise import DepthwiseConv2d
    from biformer.ops.depthwise import add_depthwise, depthwise_nhwc

    for kernel, fused in ((3, False), (5, True), (7, True)):
        conv = DepthwiseConv2d(16, kernel)
        x = torch.randn(1, 6, 6, 16, requires_grad=True)
        assert ("FusedDepthwiseConv" in type(depthwise_nhwc(x, conv).grad_fn).__name__) == fused
        image = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
        summed = add_depthwise(image, conv)
        assert ("FusedDepthwiseConv" in type(summed.grad_fn.next_functions[0][0]).__name__) == fused
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 training keeps PyTorch's conv
            assert "FusedDepthwiseConv" not in type(depthwise_nhwc(x, conv).grad_fn).__name__
