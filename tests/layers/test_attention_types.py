"""The comparison token mixers (global, window, shifted window, axial, dilated, deformable) against a plain
float64 formulation: dense attention over the whole map with a mask written from each paper's definition
(token by token, no reshapes shared with the library), plus the equivalence properties, shapes at odd
sizes, gradients and bad inputs."""

from __future__ import annotations

import bisect
import math

import pytest
import torch
import torch.nn.functional as F

from biformer.layers import (
    ATTENTION_TYPES,
    AxialStripeAttention,
    BiLevelRoutingAttention,
    DeformableAttention,
    DilatedAttention,
    GlobalAttention,
    WindowAttention,
    build_token_mixer,
)


def randomize(layer: torch.nn.Module) -> torch.nn.Module:
    """Parameters of a useful size (default inits give near-uniform attention, which hides mistakes)."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    return layer.double()


def plain_projections(layer, x):
    """q, k, v (N, H, W, c) in float64 from ``layer``'s qkv Linear."""
    qkv = x @ layer.qkv.qkv.weight.T + layer.qkv.qkv.bias
    return qkv[..., : layer.qk_dim], qkv[..., layer.qk_dim : 2 * layer.qk_dim], qkv[..., 2 * layer.qk_dim :]


def plain_output(layer, attended, value):
    """attention output (N, H, W, C) + LCE(v), then wo."""
    if layer.lepe is not None:
        kernel = layer.lepe.weight
        attended = attended + F.conv2d(
            value.permute(0, 3, 1, 2), kernel, layer.lepe.bias, padding=kernel.shape[-1] // 2, groups=layer.dim
        ).permute(0, 2, 3, 1)
    return attended @ layer.wo.weight.T + layer.wo.bias


def plain_masked_attention(layer, x, allowed):
    """Dense attention where query token p may see key token t iff ``allowed(head, p, t)``; p, t = (row, col)."""
    batch, height, width, _ = x.shape
    query, key, value = plain_projections(layer, x)
    positions = [(row, col) for row in range(height) for col in range(width)]
    heads, qk_head, v_head = layer.num_heads, layer.qk_dim // layer.num_heads, layer.dim // layer.num_heads
    q, k, v = (t.reshape(batch, height * width, -1) for t in (query, key, value))
    outs = []
    for head in range(heads):
        mask = torch.tensor([[allowed(head, p, t) for t in positions] for p in positions])
        qk_channels = slice(head * qk_head, (head + 1) * qk_head)
        logits = q[..., qk_channels] @ k[..., qk_channels].transpose(1, 2)
        logits = (logits * layer.scale).masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(logits, dim=-1) @ v[..., head * v_head : (head + 1) * v_head])
    attended = torch.cat(outs, dim=-1).reshape(batch, height, width, layer.dim)
    return plain_output(layer, attended, value)


def window_index(coordinate: int, side: int, window: int, shift: int) -> int:
    """Which window a row (or column) falls in: windows start at 0, then at every ``shift + k * window``."""
    window = min(window, side)
    shift = shift if side > window else 0
    starts = [0] + [start for start in range(shift, side, window) if start > 0]
    return bisect.bisect_right(starts, coordinate) - 1


def window_rule(height, width, window, shift):
    def allowed(head, p, t):
        return all(
            window_index(a, side, window, shift) == window_index(b, side, window, shift)
            for a, b, side in ((p[0], t[0], height), (p[1], t[1], width))
        )

    return allowed


def make(cls, **kwargs):
    return randomize(cls(**{"dim": 16, "num_heads": 2, "side_dwconv": 3, **kwargs}))


def x_of(height, width, dim=16, batch=2):
    return torch.randn(batch, height, width, dim, dtype=torch.float64)


def test_global_matches_dense_attention():
    layer, x = make(GlobalAttention, qk_dim=8), x_of(5, 7)
    torch.testing.assert_close(layer(x), plain_masked_attention(layer, x, lambda h, p, t: True))


@pytest.mark.parametrize(
    "height, width, window, shift",
    [(8, 8, 4, 0), (13, 9, 4, 0), (13, 9, 4, 2), (9, 11, 3, 1), (5, 12, 6, 3), (7, 7, 3, 2)],
)
def test_window_matches_masked_dense_formulation(height, width, window, shift):
    layer, x = make(WindowAttention, window=window, shift=shift), x_of(height, width)
    torch.testing.assert_close(layer(x), plain_masked_attention(layer, x, window_rule(height, width, window, shift)))


@pytest.mark.parametrize("shift", [0, 3])
def test_window_covering_the_map_is_global_attention(shift):
    window = make(WindowAttention, window=7, shift=shift)
    global_attention = GlobalAttention(16, num_heads=2, side_dwconv=3).double()
    global_attention.load_state_dict(window.state_dict())
    x = x_of(6, 7)
    torch.testing.assert_close(window(x), global_attention(x))


def test_bra_routing_every_region_is_global_attention():
    bra = randomize(BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=9, side_dwconv=3, auto_pad=True))
    global_attention = GlobalAttention(16, num_heads=2, side_dwconv=3).double()
    global_attention.load_state_dict(bra.state_dict())
    x = x_of(9, 6)
    torch.testing.assert_close(bra(x), global_attention(x))


@pytest.mark.parametrize("height, width, stripe_width", [(6, 8, 2), (13, 9, 4), (5, 7, 1), (4, 3, 5)])
def test_axial_matches_stripe_masked_dense_formulation(height, width, stripe_width):
    layer, x = make(AxialStripeAttention, num_heads=4, stripe_width=stripe_width), x_of(height, width)

    def allowed(head, p, t):
        axis = 0 if head < 2 else 1  # first half of the heads: horizontal stripes (rows); second: vertical
        return p[axis] // stripe_width == t[axis] // stripe_width

    torch.testing.assert_close(layer(x), plain_masked_attention(layer, x, allowed))


@pytest.mark.parametrize("height, width, grid", [(8, 12, 4), (13, 9, 4), (9, 7, 3), (5, 6, 7)])
def test_dilated_matches_strided_masked_dense_formulation(height, width, grid):
    layer, x = make(DilatedAttention, grid=grid), x_of(height, width)
    step_h, step_w = math.ceil(height / min(grid, height)), math.ceil(width / min(grid, width))

    def allowed(head, p, t):
        return p[0] % step_h == t[0] % step_h and p[1] % step_w == t[1] % step_w

    torch.testing.assert_close(layer(x), plain_masked_attention(layer, x, allowed))


def plain_bilinear(image, row, col):
    """image (H, W, c) at the real-valued pixel position (row, col), clamped to the border."""
    height, width = image.shape[0], image.shape[1]
    row, col = min(max(row, 0.0), height - 1.0), min(max(col, 0.0), width - 1.0)
    r0, c0 = math.floor(row), math.floor(col)
    r1, c1 = min(r0 + 1, height - 1), min(c0 + 1, width - 1)
    a, b = row - r0, col - c0
    return (
        image[r0, c0] * (1 - a) * (1 - b) + image[r0, c1] * (1 - a) * b
        + image[r1, c0] * a * (1 - b) + image[r1, c1] * a * b
    )


def plain_deformable(layer, x, positions):
    """All queries attend K/V sampled at ``positions`` [group][image] -> list of (row, col) pixel positions."""
    batch, height, width, _ = x.shape
    query, key, value = plain_projections(layer, x)
    groups, heads = layer.offset_groups, layer.num_heads
    qk_head, v_head = layer.qk_dim // heads, layer.dim // heads
    out = torch.zeros(batch, height * width, layer.dim, dtype=x.dtype)
    for n in range(batch):
        for head in range(heads):
            group = head // (heads // groups)
            points = positions[group][n]
            qk_channels = slice(head * qk_head, (head + 1) * qk_head)
            v_channels = slice(head * v_head, (head + 1) * v_head)
            keys = torch.stack([plain_bilinear(key[n], r, c) for r, c in points])[:, qk_channels]
            values = torch.stack([plain_bilinear(value[n], r, c) for r, c in points])[:, v_channels]
            q = query[n].reshape(height * width, -1)[:, qk_channels]
            out[n, :, v_channels] = torch.softmax(q @ keys.T * layer.scale, dim=-1) @ values
    return plain_output(layer, out.reshape(batch, height, width, layer.dim), value)


@pytest.mark.parametrize("height, width, points", [(13, 9, 4), (6, 6, 3), (5, 8, 8)])
def test_deformable_with_zero_offsets_attends_a_fixed_bilinear_lattice(height, width, points):
    layer, x = make(DeformableAttention, points=points), x_of(height, width)
    with torch.no_grad():
        layer.offset_net[-1].weight.zero_()
    points_h, points_w = min(points, height), min(points, width)
    lattice = [
        ((i + 0.5) * height / points_h - 0.5, (j + 0.5) * width / points_w - 0.5)
        for i in range(points_h) for j in range(points_w)
    ]  # cell centres in pixel coordinates (pixel p covers [p - 0.5, p + 0.5])
    torch.testing.assert_close(layer(x), plain_deformable(layer, x, [[lattice] * x.shape[0]]))


def test_deformable_with_learned_offsets_samples_where_its_grid_says():
    """Two offset groups, random offsets: the sampling and the group-to-head assignment."""
    layer, x = make(DeformableAttention, num_heads=4, points=3, offset_groups=2, offset_range=3.0), x_of(7, 5)
    with torch.no_grad():
        grid = layer.sampling_grid(plain_projections(layer, x)[0])  # (N * groups, 3, 3, 2), (x, y) in [-1, 1]
    assert grid.abs().max() > 1, "the offsets should reach past the border for this test to cover clamping"
    height, width = x.shape[1], x.shape[2]
    grid = grid.reshape(x.shape[0], 2, 9, 2)
    positions = [
        [[((y + 1) * height / 2 - 0.5, (gx + 1) * width / 2 - 0.5) for gx, y in grid[n, g].tolist()] for n in range(2)]
        for g in range(2)
    ]
    torch.testing.assert_close(layer(x), plain_deformable(layer, x, positions))


def test_deformable_with_a_point_per_token_and_zero_offsets_is_global_attention():
    layer = make(DeformableAttention, points=8)
    with torch.no_grad():
        layer.offset_net[-1].weight.zero_()
    global_attention = GlobalAttention(16, num_heads=2, side_dwconv=3).double()
    global_attention.load_state_dict(layer.state_dict(), strict=False)
    x = x_of(6, 8)
    torch.testing.assert_close(layer(x), global_attention(x))


SMALL_OPTIONS = {"bra": dict(n_win=3, topk=2), "window": dict(window=4), "shifted_window": dict(window=4),
                 "axial": dict(stripe_width=2), "dilated": dict(grid=3), "deformable": dict(points=3)}


@pytest.mark.parametrize("attn_type", ATTENTION_TYPES)
@pytest.mark.parametrize("height, width", [(13, 9), (1, 1), (1, 7), (4, 4)])
def test_any_input_size_keeps_the_shape(attn_type, height, width):
    layer = build_token_mixer(attn_type, 16, num_heads=2, **SMALL_OPTIONS.get(attn_type, {}))
    out = layer(torch.randn(2, height, width, 16))
    assert out.shape == (2, height, width, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("attn_type", ATTENTION_TYPES)
def test_gradients_reach_every_parameter_and_the_input(attn_type):
    layer = build_token_mixer(attn_type, 16, num_heads=2, qk_dim=8, **SMALL_OPTIONS.get(attn_type, {}))
    x = torch.randn(2, 13, 9, 16, requires_grad=True)
    (layer(x) * torch.randn(2, 13, 9, 16)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("attn_type", ATTENTION_TYPES)
def test_same_parameters_as_bra_besides_the_offset_network(attn_type):
    layer = build_token_mixer(attn_type, 16, num_heads=2, **SMALL_OPTIONS.get(attn_type, {}))
    keys = [key for key in layer.state_dict() if not key.startswith("offset_net.")]
    assert keys == ["lepe.weight", "lepe.bias", "qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias"]


def test_build_token_mixer_picks_the_module_and_the_shift():
    assert build_token_mixer("shifted_window", 16, num_heads=2, window=6).shift == 3
    assert build_token_mixer("shifted_window", 16, num_heads=2, window=6, shift=False).shift == 0
    assert build_token_mixer("window", 16, num_heads=2, window=6).shift == 0
    assert build_token_mixer("window", 16, num_heads=2, window=6, shift=True).shift == 3
    assert isinstance(build_token_mixer("dilated", 16, num_heads=2, grid=5), DilatedAttention)
    assert build_token_mixer("bra", 16, num_heads=2, n_win=2, topk=1).auto_pad


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_token_mixer("swin", 16, num_heads=2), "attn_type: expected one of .*got 'swin'"),
        (lambda: build_token_mixer(None, 16, num_heads=2), "attn_type: expected one of .*got None"),
        (lambda: build_token_mixer("axial", 16, num_heads=2, window=3), "window: not an option of attn_type 'axial'"),
        (lambda: build_token_mixer("global", 16, num_heads=2, topk=3), "topk: not an option of attn_type 'global'"),
        (lambda: build_token_mixer("dilated", 16, num_heads=2, shift=True), "shift: only window attention"),
        (lambda: build_token_mixer("window", 16, num_heads=2, shift=1), "shift: expected None, True or False"),
        (lambda: build_token_mixer("window", 16, num_heads=2, window=0), "window: expected an integer >= 1, got 0"),
        (lambda: build_token_mixer("shifted_window", 16, num_heads=2, window=True), "window: expected an integer"),
        (lambda: build_token_mixer("window", 16, num_heads=2, window=2.5), "window: expected an integer"),
        (lambda: WindowAttention(16, num_heads=2, window=4, shift=4), "shift: expected an integer with 0 <= shift"),
        (lambda: build_token_mixer("axial", 16, num_heads=1), "num_heads: .*even number, got 1"),
        (lambda: build_token_mixer("axial", 16, num_heads=2, stripe_width=-1), "stripe_width: expected an integer"),
        (lambda: build_token_mixer("dilated", 16, num_heads=2, grid=0), "grid: expected an integer >= 1"),
        (lambda: build_token_mixer("deformable", 16, num_heads=2, points=0), "points: expected an integer >= 1"),
        (lambda: build_token_mixer("deformable", 16, num_heads=4, offset_groups=3), "offset_groups: expected a div"),
        (lambda: build_token_mixer("deformable", 16, num_heads=2, offset_range=0), "offset_range: expected a positive"),
        (lambda: build_token_mixer("global", 16, num_heads=3), "num_heads: dim \\(16\\) and qk_dim"),
        (lambda: build_token_mixer("window", 16, num_heads=2, side_dwconv=4), "side_dwconv: expected an odd"),
        (lambda: build_token_mixer("global", 16, num_heads=2, qk_scale=-1.0), "qk_scale: expected None or a positive"),
    ],
)
def test_bad_construction_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("attn_type", [t for t in ATTENTION_TYPES if t != "bra"])
@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 5, 5, 8), "expected 16 channels on axis 3 \\(NHWC\\), got 8"),
        (torch.randn(5, 5, 16), "expected a 4-D tensor"),
        (torch.ones(1, 5, 5, 16, dtype=torch.long), "expected a floating-point tensor"),
        (torch.randn(1, 0, 5, 16), "expected non-empty batch and spatial sizes"),
    ],
)
def test_bad_inputs_name_the_layer(attn_type, x, match):
    layer = build_token_mixer(attn_type, 16, num_heads=2, **SMALL_OPTIONS.get(attn_type, {}))
    with pytest.raises(ValueError, match=f"{type(layer).__name__} input: {match}"):
        layer(x)
