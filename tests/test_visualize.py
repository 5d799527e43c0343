"""Routing pictures: region geometry, a query token's attention (vs the authors' fixture and the layers' own
outputs), and the drawn regions checked against the routing the model recorded."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import biformer
from biformer import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW
from biformer.images import ImageError
from biformer.visualize import (
    default_layers,
    explain_routing,
    plot_routing,
    prepare_image,
    region_grid,
    show_routing,
    token_attention,
)
from conftest import fixture_state_dict, load_fixture

MICRO = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=10)


@pytest.fixture(scope="module")
def micro_model():
    """biformer_tiny's architecture at micro width with the authors' fixture weights (auto_pad, any size)."""
    model = timm.create_model("biformer_tiny", **MICRO)
    model.load_state_dict(fixture_state_dict(load_fixture("biformer_micro")[0]), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def picture():
    """A 96 x 64 (W x H) image: non-square, so every stage pads its map to the 7 x 7 region grid."""
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(64, 96, 3, generator=generator) * 255).to(torch.uint8)
    pixels[10:40, 20:60] = torch.tensor([250, 40, 40], dtype=torch.uint8)  # a red block: some structure
    return Image.fromarray(pixels.numpy())


def randomised(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    return layer.eval()


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, size, expected",
    [
        # n_win regions per side of ceil(map / n_win) tokens (auto_pad pads to grid * region)
        (BiLevelRoutingAttention(8, 1, n_win=7, topk=2, auto_pad=True), (16, 24), (7, 7, 3, 4)),
        (BiLevelRoutingAttention(8, 1, n_win=4, topk=2), (16, 8), (4, 4, 4, 2)),
        # fixed region size: the grid follows the map
        (BiLevelRoutingAttention(8, 1, n_win=7, topk=2, region_size=4), (10, 13), (3, 4, 4, 4)),
        # NCHW: regions of map // n_win tokens, ceil(map / region) per side
        (BiLevelRoutingAttentionNCHW(8, 1, n_win=7, topk=2), (16, 16), (8, 8, 2, 2)),
        (BiLevelRoutingAttentionNCHW(8, 1, n_win=7, topk=2), (5, 9), (5, 9, 1, 1)),
    ],
)
def test_region_grid_matches_the_layer(layer, size, expected):
    grid = region_grid(layer, *size)
    assert (grid.grid_h, grid.grid_w, grid.region_h, grid.region_w) == expected
    nchw = isinstance(layer, BiLevelRoutingAttentionNCHW)
    x = torch.randn(1, 8, *size) if nchw else torch.randn(1, *size, 8)
    _, topk_index = layer(x, return_routing=True)
    assert topk_index.shape[1] == grid.num_regions


def test_token_span_is_clipped_to_the_unpadded_map():
    grid = region_grid(BiLevelRoutingAttention(8, 1, n_win=7, topk=2, auto_pad=True), 16, 16)  # regions of 3
    assert grid.token_span(0) == (0, 3, 0, 3)
    assert grid.token_span(5 * 7 + 5) == (15, 16, 15, 16)  # partly padding
    start_row, stop_row, _, _ = grid.token_span(6 * 7)  # the last region row is all padding
    assert start_row == stop_row
    assert grid.region_of(15, 2) == 5 * 7 + 0
    with pytest.raises(ValueError, match="region"):
        grid.token_span(49)


# --- a query token's attention -----------------------------------------------------------------


def test_attention_matches_the_authors_attention_weights():
    """The fixture stores the reference's softmax attention (N*regions, heads, 16 queries, 4 x 16 keys)."""
    tensors, meta = load_fixture("bra_layer")
    layer = BiLevelRoutingAttention(**meta["constructor_kwargs"]).eval()
    layer.load_state_dict(fixture_state_dict(tensors), strict=True)
    x, weights, fixture_routing = tensors["input"], tensors["attn_weight"], tensors["topk_index"]
    with torch.no_grad():
        _, topk_index = layer(x, return_routing=True)
    for batch_index, row, col in [(0, 0, 0), (0, 5, 11), (1, 15, 15), (1, 8, 3), (0, 12, 7)]:
        attention = token_attention(layer, x, topk_index, row, col, batch_index=batch_index)
        region, token = (row // 4) * 4 + col // 4, (row % 4) * 4 + col % 4
        reference = weights[batch_index * 16 + region, :, token].view(2, 4, 16)  # (heads, topk, region tokens)
        expected = torch.zeros(2, 16, 16)
        for rank, routed in enumerate(fixture_routing[batch_index, region].tolist()):
            grid_row, grid_col = divmod(routed, 4)
            expected[:, grid_row * 4 : grid_row * 4 + 4, grid_col * 4 : grid_col * 4 + 4] = reference[:, rank].view(
                2, 4, 4
            )
        assert attention.query_region == region
        torch.testing.assert_close(attention.heat, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attention.probabilities.sum(dim=(1, 2)), torch.ones(2))


def token_position(grid, region, token):
    grid_row, grid_col = divmod(region, grid.grid_w)
    return grid_row * grid.region_h + token // grid.region_w, grid_col * grid.region_w + token % grid.region_w


def plain_output_at(layer, x, attention, row, col):
    """The layer's output at (row, col) rebuilt in float64 from the attention probabilities and V."""
    params = {key: value.double() for key, value in layer.state_dict().items()}
    x = x.double()[0]
    grid = attention.grid
    padded = (0, grid.grid_w * grid.region_w - grid.map_w, 0, grid.grid_h * grid.region_h - grid.map_h)
    if isinstance(layer, BiLevelRoutingAttentionNCHW):
        qkv = torch.einsum("chw,oc->hwo", x, params["qkv_linear.weight"][:, :, 0, 0]) + params["qkv_linear.bias"]
        value = qkv[..., 2 * layer.dim :]  # (H, W, C)
        lepe_input = value
        value = F.pad(value, (0, 0, *padded))  # zero-padded after the projection
        out_weight, out_bias = params["output_linear.weight"][:, :, 0, 0], params["output_linear.bias"]
    else:
        qkv = F.pad(x, (0, 0, *padded)) @ params["qkv.qkv.weight"].T + params["qkv.qkv.bias"]
        value = lepe_input = qkv[..., 2 * layer.qk_dim :]  # padded before the projection
        out_weight, out_bias = params["wo.weight"], params["wo.bias"]
    heads, head_dim = layer.num_heads, value.shape[-1] // layer.num_heads
    mixed = torch.zeros(value.shape[-1], dtype=torch.float64)
    probabilities = attention.probabilities.double()
    for rank, region in enumerate(attention.routed_regions.tolist()):
        for token in range(grid.region_h * grid.region_w):
            key_row, key_col = token_position(grid, region, token)
            for head in range(heads):
                channels = slice(head * head_dim, (head + 1) * head_dim)
                mixed[channels] += probabilities[head, rank, token] * value[key_row, key_col, channels]
    lepe = F.conv2d(lepe_input.permute(2, 0, 1)[None], params["lepe.weight"], params["lepe.bias"],
                    padding=params["lepe.weight"].shape[-1] // 2, groups=value.shape[-1])[0]
    return (mixed + lepe[:, row, col]) @ out_weight.T + out_bias


@pytest.mark.parametrize(
    "layer, size",
    [
        (BiLevelRoutingAttention(16, 2, n_win=3, qk_dim=8, topk=3, side_dwconv=3, auto_pad=True), (10, 13)),
        (BiLevelRoutingAttention(16, 2, n_win=7, topk=4, side_dwconv=3, region_size=4), (10, 7)),
        (BiLevelRoutingAttentionNCHW(16, 2, n_win=3, topk=3, side_dwconv=3), (11, 8)),
    ],
)
def test_attention_rebuilds_the_layer_output(layer, size):
    """Probabilities x values (+ LePE, output projection) give the layer's own output at the query token: the
    recomputed attention is exactly the one the layer used, padding and all."""
    layer = randomised(layer)
    nchw = isinstance(layer, BiLevelRoutingAttentionNCHW)
    x = torch.randn(1, 16, *size) if nchw else torch.randn(1, *size, 16)
    with torch.no_grad():
        out, topk_index = layer(x, return_routing=True)
    for row, col in [(0, 0), (size[0] - 1, size[1] - 1), (size[0] // 2, 1)]:
        attention = token_attention(layer, x, topk_index, row, col)
        actual = out[0, :, row, col] if nchw else out[0, row, col]
        torch.testing.assert_close(actual.double(), plain_output_at(layer, x, attention, row, col),
                                   atol=1e-4, rtol=1e-4)
        assert attention.heat.shape == (layer.num_heads, *size)
        # the heat map is the probabilities at the keys inside the map; padded keys carry the rest
        assert torch.all(attention.heat.sum(dim=(1, 2)) <= 1 + 1e-5)


def test_token_attention_bad_inputs():
    layer = BiLevelRoutingAttention(8, 1, n_win=2, topk=2).eval()
    x = torch.randn(1, 4, 4, 8)
    _, topk_index = layer(x, return_routing=True)
    with pytest.raises(ValueError, match="inside the 4x4 map"):
        token_attention(layer, x, topk_index, 4, 0)
    with pytest.raises(ValueError, match="topk_index: expected 4 query regions"):
        token_attention(layer, x, topk_index[:, :2], 0, 0)
    with pytest.raises(TypeError, match="BRA layer"):
        token_attention(nn.Linear(8, 8), x, topk_index, 0, 0)


# --- the picture ----------------------------------------------------------------------------------


def expected_box(region, grid_w, region_size, map_size, image_size):
    """Pixel box of a region in the image, clipped; None when entirely padding (written out by hand)."""
    (region_h, region_w), (map_h, map_w), (width, height) = region_size, map_size, image_size
    grid_row, grid_col = divmod(region, grid_w)
    row0, col0 = grid_row * region_h, grid_col * region_w
    if row0 >= map_h or col0 >= map_w:
        return None
    row1, col1 = min(row0 + region_h, map_h), min(col0 + region_w, map_w)
    return col0 * width / map_w, row0 * height / map_h, col1 * width / map_w, row1 * height / map_h


def test_drawn_regions_are_the_recorded_routing(micro_model, picture):
    points = [(2.0, 3.0), (95.0, 63.0), (40.0, 25.0)]
    panels = explain_routing(micro_model, picture, points, image_size=64)
    figure = plot_routing(picture, panels)
    # The routing the model records on the same input, independently of the visualisation code.
    with torch.no_grad(), biformer.record_routing(micro_model) as routing:
        micro_model(prepare_image(picture, micro_model, 64))
    layers = ["stages.0.0.attn", "stages.1.0.attn", "stages.2.1.attn"]  # last BRA block of each stage
    map_sizes = {"stages.0.0.attn": (16, 24), "stages.1.0.attn": (8, 12), "stages.2.1.attn": (4, 6)}
    assert [[panel.layer for panel in row] for row in panels] == [layers] * 3
    axes = figure.axes
    assert len(axes) == 9
    for point_index, point in enumerate(points):
        for layer_index, name in enumerate(layers):
            panel, ax = panels[point_index][layer_index], axes[point_index * 3 + layer_index]
            map_h, map_w = map_sizes[name]
            region_h, region_w = math.ceil(map_h / 7), math.ceil(map_w / 7)
            row, col = int(point[1] * map_h / 64), int(point[0] * map_w / 96)
            query_region = (row // region_h) * 7 + col // region_w
            routed = routing[name][0, query_region].tolist()
            assert panel.token == (row, col) and panel.query_region == query_region
            assert panel.routed_regions == routed
            drawn = {patch.get_gid(): patch for patch in ax.patches}
            boxes = {rank: expected_box(region, 7, (region_h, region_w), (map_h, map_w), (96, 64))
                     for rank, region in enumerate(routed, 1)}
            expected_gids = {f"routed:{rank}:{routed[rank - 1]}" for rank, box in boxes.items() if box}
            assert set(drawn) == expected_gids | {f"query:{query_region}"}
            for rank, box in boxes.items():
                if box is None:
                    continue
                patch = drawn[f"routed:{rank}:{routed[rank - 1]}"]
                x0, y0, x1, y1 = box
                assert patch.get_xy() == pytest.approx((x0, y0))
                assert (patch.get_width(), patch.get_height()) == pytest.approx((x1 - x0, y1 - y0))
            assert panel.padding_ranks == [rank for rank, box in boxes.items() if box is None]
            labels = {text.get_gid(): text.get_text() for text in ax.texts}
            assert labels == {f"rank:{rank}:{routed[rank - 1]}": str(rank) for rank, box in boxes.items() if box}
            # attention only inside the routed regions
            allowed = torch.zeros(map_h, map_w, dtype=torch.bool)
            for region in routed:
                grid_row, grid_col = divmod(region, 7)
                allowed[grid_row * region_h : (grid_row + 1) * region_h,
                        grid_col * region_w : (grid_col + 1) * region_w] = True
            assert panel.heat.shape == (map_h, map_w)
            assert torch.all(panel.heat[~allowed] == 0) and panel.heat[allowed].sum() > 0
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=60)
    assert Image.open(io.BytesIO(png.getvalue())).size[0] > 100


def test_show_routing_on_the_nchw_variant(picture):
    model = timm.create_model("biformer_stl_nchw", depth=[1, 1, 2, 1], embed_dim=[32, 64, 64, 96], num_classes=3)
    figure = show_routing(model, picture, [(50, 30)], image_size=64)
    with torch.no_grad(), biformer.record_routing(model.eval()) as routing:
        model(prepare_image(picture, model, 64))
    # stage 1 map 16 x 24, n_win 7: regions of 2 x 3 tokens, an 8 x 8 grid
    row, col = int(30 * 16 / 64), int(50 * 24 / 96)
    query_region = (row // 2) * 8 + col // 3
    routed = routing["stages.0.blocks.0.attn"][0, query_region].tolist()
    gids = {patch.get_gid() for patch in figure.axes[0].patches}
    assert gids == {f"query:{query_region}"} | {f"routed:{rank}:{region}" for rank, region in enumerate(routed, 1)}


def test_default_layers_pick_the_last_block_of_each_stage():
    names = [name for name, m in timm.create_model("biformer_tiny").named_modules()
             if isinstance(m, BiLevelRoutingAttention)]
    assert default_layers(names) == ["stages.0.1.attn", "stages.1.1.attn", "stages.2.7.attn"]
    assert default_layers(["stages.0.blocks.0.attn", "stages.0.blocks.1.attn", "stages.1.blocks.0.attn"]) == [
        "stages.0.blocks.1.attn", "stages.1.blocks.0.attn"]
    assert default_layers(["encoder.bra", "decoder.bra"]) == ["encoder.bra", "decoder.bra"]


def test_model_mode_is_restored(micro_model, picture):
    micro_model.train()
    try:
        explain_routing(micro_model, picture, [(1, 1)], layers=["stages.0.0.attn"], image_size=32)
        assert micro_model.training
    finally:
        micro_model.eval()


@pytest.mark.parametrize(
    "points, kwargs, match",
    [
        ([(96, 10)], {}, r"\(96, 10\) is outside the 96x64 image"),
        ([(-1, 10)], {}, "outside"),
        ([(1, 64)], {}, "outside"),
        ([], {}, "at least one"),
        ([(1, float("nan"))], {}, "finite"),
        ([(1, 2, 3)], {}, r"\(x, y\) pairs"),
        ([(1, 1)], {"layers": ["stages.9.attn"]}, "layers: expected names from"),
        ([(1, 1)], {"image_size": 0}, "image_size: expected a positive integer"),
    ],
)
def test_bad_inputs(micro_model, picture, points, kwargs, match):
    with pytest.raises(ValueError, match=match):
        explain_routing(micro_model, picture, points, **{"image_size": 32, **kwargs})


def test_unreadable_image_and_model_without_bra(micro_model, picture, tmp_path):
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(ImageError, match="cannot read"):
        explain_routing(micro_model, tmp_path / "not.png", [(1, 1)])
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no Bi-Level Routing Attention layer"):
        explain_routing(convnet, picture, [(1, 1)], image_size=16)
    with pytest.raises(ValueError, match="at least one row"):
        plot_routing(picture, [])
