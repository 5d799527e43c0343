"""``BiFormer(attn_type=...)``: the same network with another attention, and nothing else changed."""

from __future__ import annotations

import pytest
import timm
import torch

from biformer.hub import load_pretrained, save_pretrained
from biformer.layers import (
    ATTENTION_TYPES,
    AttentionLePE,
    AxialStripeAttention,
    BiLevelRoutingAttention,
    DeformableAttention,
    DilatedAttention,
    GlobalAttention,
    WindowAttention,
)
from biformer.layers.token_mixers import STAGE_SIZES
from biformer.models.biformer import BiFormer

MODULES = {"global": GlobalAttention, "window": WindowAttention, "shifted_window": WindowAttention,
           "axial": AxialStripeAttention, "dilated": DilatedAttention, "deformable": DeformableAttention}
TINY = dict(depth=[2, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=8, n_win=2,
            topks=[1, 2, 4, -2], mlp_ratios=[2, 2, 2, 2], auto_pad=True, num_classes=5)


def attention_modules(model):
    return [block.attn for stage in model.stages for block in stage]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BiFormer(**{**TINY, **kwargs}).eval()


def test_none_and_bra_are_todays_network():
    default, none, bra = build(), build(attn_type=None), build(attn_type="bra")
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = default(x)
        for model in (none, bra):
            assert list(model.state_dict()) == list(default.state_dict())
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    kinds = [type(module) for module in attention_modules(bra)]
    assert kinds == [BiLevelRoutingAttention] * 4 + [AttentionLePE]


@pytest.mark.parametrize("attn_type", [t for t in ATTENTION_TYPES if t != "bra"])
def test_every_type_changes_only_the_attention(attn_type):
    default, model = build(), build(attn_type=attn_type)
    assert all(isinstance(module, MODULES[attn_type]) for module in attention_modules(model))
    outside = {key: value.shape for key, value in default.state_dict().items() if ".attn." not in key}
    assert {key: value.shape for key, value in model.state_dict().items() if ".attn." not in key} == outside
    x = torch.randn(2, 3, 36, 44)  # stage maps 9x11, 5x6, 3x3, 2x2: padding everywhere
    model.train()
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing


@pytest.mark.parametrize("attn_type, option", [("window", "window"), ("axial", "stripe_width"), ("dilated", "grid"),
                                               ("deformable", "points")])
def test_default_sizes_follow_the_stage_table_and_attn_kwargs_override_them(attn_type, option):
    model = build(attn_type=attn_type)
    sizes = [getattr(stage[0].attn, option) for stage in model.stages]
    assert sizes == list(STAGE_SIZES[attn_type])
    model = build(attn_type=attn_type, attn_kwargs=[{option: 3}, None, {option: 2}, {}])
    assert [getattr(stage[0].attn, option) for stage in model.stages] == [3, STAGE_SIZES[attn_type][1], 2,
                                                                          STAGE_SIZES[attn_type][3]]
    assert [getattr(stage[0].attn, option) for stage in build(attn_type=attn_type, attn_kwargs={option: 5}).stages] \
        == [5] * 4


def test_shifted_window_alternates_the_shift_within_a_stage():
    model = build(attn_type="shifted_window", attn_kwargs={"window": 4}, depth=[3, 2, 1, 1])
    assert [[block.attn.shift for block in stage] for stage in model.stages] == [[0, 2, 0], [0, 2], [0], [0]]
    assert all(block.attn.shift == 0 for stage in build(attn_type="window").stages for block in stage)


def test_per_stage_types():
    model = build(attn_type=["window", "bra", "deformable", "global"])
    kinds = [type(module) for module in attention_modules(model)]
    assert kinds == [WindowAttention, WindowAttention, BiLevelRoutingAttention, DeformableAttention, GlobalAttention]
    # 'bra' on a stage whose topk is -2 is today's global attention (the reference's AttentionLePE)
    assert isinstance(build(attn_type=("window", "window", "window", "bra")).stages[3][0].attn, AttentionLePE)


def test_registered_models_take_attn_type():
    model = timm.create_model("biformer_nano", attn_type="window", num_classes=3)
    assert all(isinstance(module, WindowAttention) for module in attention_modules(model))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 40, 24)).shape == (1, 3)
    features = timm.create_model("biformer_nano", attn_type="axial", features_only=True)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in features.eval()(torch.randn(1, 3, 36, 52))]
    assert shapes == [(1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4), (1, 256, 2, 2)]


def test_hub_folder_rebuilds_the_attention_type(tmp_path):
    small = dict(depth=[2, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=8)
    model = timm.create_model("biformer_tiny", **small, num_classes=3, attn_type="shifted_window",
                              attn_kwargs={"window": 4}).eval()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert [block.attn.shift for block in loaded.stages[0]] == [0, 2]
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attn_type="swin"), "attn_type: expected None, one of .*got 'swin'"),
        (dict(attn_type=["window"] * 3), "attn_type: expected None, one of .* or a list of 4 of them, got"),
        (dict(attn_type=["window", "window", "nope", "window"]), "attn_type\\[2\\]: expected one of .*got 'nope'"),
        (dict(attn_type=7), "attn_type: expected None"),
        (dict(attn_kwargs={"window": 4}), "attn_kwargs: expected None when attn_type is None"),
        (dict(attn_type="window", attn_kwargs=[{}] * 3), "attn_kwargs: expected None, a dict or a list of 4"),
        (dict(attn_type="window", attn_kwargs="window=4"), "attn_kwargs: expected None, a dict or a list of 4"),
        (dict(attn_type="bra", attn_kwargs={"topk": 2}), "attn_kwargs: stage 1 uses 'bra'"),
        (dict(attn_type=["window", "bra", "window", "window"], attn_kwargs=[None, {"window": 3}, None, None]),
         "attn_kwargs: stage 2 uses 'bra'"),
        (dict(attn_type="window", attn_kwargs={"window": 0}), "window: expected an integer >= 1, got 0"),
        (dict(attn_type="window", attn_kwargs={"grid": 3}), "grid: not an option of attn_type 'window'"),
        (dict(attn_type="axial", head_dim=16), "num_heads: .*even number, got 1"),
    ],
)
def test_bad_attention_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)
