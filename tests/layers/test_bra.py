"""BiLevelRoutingAttention: the reference fixture, a float64 plain formulation, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from biformer import BiLevelRoutingAttention, attention_backend, available_backends
from conftest import assert_same_routing, fixture_state_dict, load_fixture
from plain_reference import plain_bra

BACKENDS = [name for name in available_backends()]


@pytest.fixture(scope="module")
def bra_fixture():
    tensors, meta = load_fixture("bra_layer")
    layer = BiLevelRoutingAttention(**meta["constructor_kwargs"]).eval()
    layer.load_state_dict(fixture_state_dict(tensors), strict=True)
    return layer, tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproduces_reference_fixture(bra_fixture, backend):
    layer, tensors = bra_fixture
    with torch.no_grad(), attention_backend(backend):
        out, routing = layer(tensors["input"], return_routing=True)
    torch.testing.assert_close(out, tensors["output"], atol=1e-4, rtol=1e-4)
    assert routing.dtype == torch.int64
    assert_same_routing(routing, tensors["topk_index"])


def test_state_dict_keys_are_the_reference_names(bra_fixture):
    layer, tensors = bra_fixture
    assert set(layer.state_dict()) == set(fixture_state_dict(tensors))
    assert list(layer.state_dict()) == ["lepe.weight", "lepe.bias", "qkv.qkv.weight", "qkv.qkv.bias",
                                        "wo.weight", "wo.bias"]


@pytest.mark.parametrize(
    "config",
    [
        dict(dim=16, num_heads=2, n_win=3, topk=2, height=9, width=6, auto_pad=False),
        dict(dim=16, num_heads=4, n_win=2, topk=4, height=4, width=8, auto_pad=False, qk_dim=8),
        dict(dim=8, num_heads=1, n_win=3, topk=3, height=7, width=11, auto_pad=True),  # padding, non-square
        # map smaller than the grid: padded regions are identical, so routing ties; outputs must still agree
        dict(dim=8, num_heads=2, n_win=4, topk=5, height=2, width=3, auto_pad=True, ties=True),
    ],
)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_matches_plain_float64_formulation(config, backend):
    config = dict(config)
    height, width, ties = config.pop("height"), config.pop("width"), config.pop("ties", False)
    layer = BiLevelRoutingAttention(side_dwconv=3, backend=backend, **config)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    x = torch.randn(2, height, width, config["dim"])
    out, routing = layer(x, return_routing=True)
    expected, expected_routing = plain_bra(x, layer, auto_pad=config["auto_pad"])
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if not ties:
        assert_same_routing(routing, expected_routing)


@pytest.mark.parametrize("region_size, height, width, topk", [(2, 6, 10, 3), (3, 7, 5, 2), (4, 3, 3, 4)])
def test_fixed_region_size_matches_plain_float64(region_size, height, width, topk):
    layer = BiLevelRoutingAttention(dim=8, num_heads=2, topk=topk, region_size=region_size, side_dwconv=3)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    x = torch.randn(2, height, width, 8)
    out, routing = layer(x, return_routing=True)
    expected, expected_routing = plain_bra(x, layer)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grid = (-(-height // region_size)) * (-(-width // region_size))
    assert routing.shape == (2, grid, min(topk, grid))
    if grid > 1:
        assert_same_routing(routing, expected_routing)


def test_fixed_region_size_keeps_keys_per_query_constant():
    layer = BiLevelRoutingAttention(dim=8, num_heads=2, topk=4, region_size=4)
    for size in (16, 32, 64):
        _, routing = layer(torch.randn(1, size, size, 8), return_routing=True)
        assert routing.shape == (1, (size // 4) ** 2, 4)  # 4 regions of 16 tokens = 64 keys at every size


def test_topk_all_regions_is_full_attention_plus_lce():
    layer = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=2, topk=4, side_dwconv=3).double()
    x = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    qkv = layer.qkv(x).view(1, 24, 24)
    q, k, v = qkv.split([8, 8, 8], dim=-1)
    heads = lambda t: t.view(1, 24, 2, 4).transpose(1, 2)  # noqa: E731
    attention = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * layer.scale, -1) @ heads(v)
    attention = attention.transpose(1, 2).reshape(1, 4, 6, 8)
    lce = layer.lepe(v.view(1, 4, 6, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.wo(attention + lce))


def test_gradients_flow_to_every_parameter():
    layer = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2, auto_pad=True)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_usable_as_drop_in_layer_in_a_network():
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), BiLevelRoutingAttention(32, num_heads=4, n_win=4, topk=2,
                                                                              auto_pad=True))
    assert net(torch.randn(2, 10, 10, 3)).shape == (2, 10, 10, 32)


# --- bad inputs -----------------------------------------------------------------------------------
@pytest.fixture
def layer():
    return BiLevelRoutingAttention(dim=8, num_heads=2, n_win=2, topk=2)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(4, 4, 8), "4-D"),
        (torch.randn(1, 4, 4, 6), "8 channels"),
        (torch.ones(1, 4, 4, 8, dtype=torch.int64), "floating-point"),
        (torch.randn(1, 0, 4, 8), "non-empty"),
        (torch.randn(1, 5, 4, 8), "multiples of n_win=2"),
        (torch.randn(1, 1, 1, 8), "multiples of n_win=2"),  # smaller than the region grid
    ],
)
def test_bad_input_raises_value_error(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer(x)


def test_not_a_tensor_raises_value_error(layer):
    with pytest.raises(ValueError, match="torch.Tensor"):
        layer([[1.0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=8, n_win=2, topk=5), "topk: expected at most n_win \\*\\* 2 = 4"),
        (dict(dim=8, n_win=2, topk=0), "topk"),
        (dict(dim=0), "dim"),
        (dict(dim=8, n_win=0), "n_win"),
        (dict(dim=8, num_heads=3), "divisible"),
        (dict(dim=8, num_heads=4, qk_dim=6, n_win=2, topk=1), "divisible"),
        (dict(dim=8, num_heads=2, side_dwconv=4), "odd"),
        (dict(dim=8, num_heads=2, qk_scale=-1.0), "qk_scale"),
        (dict(dim=8, num_heads=2, backend="cuda-magic"), "backend"),
        (dict(dim=8, num_heads=2, region_size=0), "region_size"),
    ],
)
def test_bad_hyper_parameters_raise_value_error(kwargs, message):
    kwargs.setdefault("num_heads", 2)
    with pytest.raises(ValueError, match=message):
        BiLevelRoutingAttention(**kwargs)


@pytest.mark.parametrize("option", [dict(kv_downsample_mode="ada_avgpool"), dict(param_routing=True),
                                    dict(soft_routing=True), dict(param_attention="qkv")])
def test_unused_reference_options_raise_not_implemented(option):
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        BiLevelRoutingAttention(dim=8, num_heads=2, **option)
