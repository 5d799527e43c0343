"""The one place that turns a stage's ``topk`` (the authors' sentinels) and ``attn_type`` into a token mixer,
and the one ``topk <= n_win ** 2`` rule."""

from __future__ import annotations

import pytest
import torch

import biformer
from biformer._checks import check_topk_fits
from biformer.dense import BiFormerBackbone
from biformer.layers import (
    TOKEN_MIXERS,
    AttentionLePE,
    AttentionLePENCHW,
    AxialStripeAttention,
    BiLevelRoutingAttention,
    BiLevelRoutingAttentionNCHW,
    DeformableAttention,
    DilatedAttention,
    GlobalAttention,
    WindowAttention,
    choose_token_mixer,
    stage_token_mixer,
)

STAGE = dict(num_heads=2, n_win=3, side_dwconv=3, auto_pad=True)

# (layout, topk, attn_type) -> what the authors' code builds (its class name), our name and class, heads, LePE kernel
# (None: no LePE). The authors' models/biformer.py and biformer_stl.py: topk > 0 BiLevelRoutingAttention, -1
# Attention, -2 AttentionLePE(side_dwconv); biformer_stl_nchw.py: topk > 0 nchwBRA, else nchwAttentionLePE
# with its default 5x5 LePE. Global attention has the authors' default 8 heads whatever num_heads says.
AUTHORS_CHOICES = [
    ("NHWC", 4, None, "BiLevelRoutingAttention", "bra", BiLevelRoutingAttention, 2, 3),
    ("NHWC", 4, "bra", "BiLevelRoutingAttention", "bra", BiLevelRoutingAttention, 2, 3),
    ("NHWC", -1, None, "Attention", "attention", AttentionLePE, 8, None),
    ("NHWC", -1, "bra", "Attention", "attention", AttentionLePE, 8, None),
    ("NHWC", -2, None, "AttentionLePE", "attention_lepe", AttentionLePE, 8, 3),
    ("NHWC", -2, "bra", "AttentionLePE", "attention_lepe", AttentionLePE, 8, 3),
    ("NCHW", 4, None, "nchwBRA", "bra_nchw", BiLevelRoutingAttentionNCHW, 2, 3),
    ("NCHW", -1, None, "nchwAttentionLePE", "attention_lepe_nchw", AttentionLePENCHW, 8, 5),
    ("NCHW", -2, None, "nchwAttentionLePE", "attention_lepe_nchw", AttentionLePENCHW, 8, 5),
]


def lepe_kernel(module: torch.nn.Module) -> int | None:
    return None if module.lepe is None else module.lepe.kernel_size[0]


@pytest.mark.parametrize(("layout", "topk", "attn_type", "authors", "name", "cls", "heads", "kernel"),
                         AUTHORS_CHOICES, ids=[f"{row[0]}-{row[1]}-{row[2]}" for row in AUTHORS_CHOICES])
def test_topks_sentinels_give_the_authors_mixer(layout, topk, attn_type, authors, name, cls, heads, kernel):
    chosen, kwargs = choose_token_mixer(topk, attn_type, layout=layout, **STAGE)
    assert chosen == name
    mixer = stage_token_mixer(32, topk, attn_type, layout=layout, **STAGE)
    assert type(mixer) is cls and TOKEN_MIXERS[name] is cls, authors
    assert mixer.num_heads == heads and lepe_kernel(mixer) == kernel
    if cls in (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW):
        assert mixer.topk == topk and mixer.n_win == 3
    if cls is BiLevelRoutingAttention:
        assert mixer.auto_pad
    channels_last = layout == "NHWC"
    x = torch.randn(1, 6, 6, 32) if channels_last else torch.randn(1, 32, 6, 6)
    assert mixer(x).shape == x.shape


COMPARISON = [("global", GlobalAttention, {}), ("window", WindowAttention, {"window": 3}),
              ("shifted_window", WindowAttention, {"window": 4}), ("axial", AxialStripeAttention, {"stripe_width": 2}),
              ("dilated", DilatedAttention, {"grid": 2}), ("deformable", DeformableAttention, {"points": 3})]


@pytest.mark.parametrize("topk", [4, -2])
@pytest.mark.parametrize(("attn_type", "cls", "options"), COMPARISON, ids=[row[0] for row in COMPARISON])
def test_another_attn_type_replaces_the_topks_choice(attn_type, cls, options, topk):
    name, kwargs = choose_token_mixer(topk, attn_type, attn_kwargs=options, shift=True, **STAGE)
    assert name == attn_type and "topk" not in kwargs and "n_win" not in kwargs
    mixer = stage_token_mixer(32, topk, attn_type, attn_kwargs=options, shift=True, **STAGE)
    assert type(mixer) is cls and mixer.num_heads == 2 and lepe_kernel(mixer) == 3
    for option, value in options.items():
        assert getattr(mixer, option) == value
    if cls is WindowAttention:
        assert mixer.shift == options["window"] // 2  # shift=True reaches the window types only
    assert mixer(torch.randn(1, 6, 6, 32)).shape == (1, 6, 6, 32)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (dict(topk=0), NotImplementedError, "topks value 0 is not implemented"),
        (dict(topk=-3), NotImplementedError, "topks value -3 is not implemented"),
        (dict(topk=-3, layout="NCHW"), NotImplementedError, "topks value -3 is not implemented"),
        (dict(topk=True), ValueError, "topks: expected integers"),
        (dict(topk=1.5), ValueError, "topks: expected integers"),
        (dict(topk=4, attn_type="swin"), ValueError, "attn_type: expected one of"),
        (dict(topk=4, attn_type="window", layout="NCHW"), ValueError, "attn_type: the NCHW models"),
        (dict(topk=4, layout="NCHW", qk_dim=16), ValueError, "qk_dim: the NCHW BRA does not take it"),
        (dict(topk=4, layout="NCHW", region_size=4), ValueError, "region_size: the NCHW BRA does not take it"),
        (dict(topk=4, layout="NDHWC"), ValueError, "layout: expected one of"),
        (dict(topk=4, attn_type="shifted_window", shift=True, attn_kwargs={"topk": 2}), ValueError,
         "topk: not an option of attn_type 'shifted_window'"),
    ],
)
def test_choices_that_do_not_exist_are_named(call, error, message):
    call = {**STAGE, **call}
    with pytest.raises(error, match=message):
        stage_token_mixer(32, call.pop("topk"), call.pop("attn_type", None), **call)


TOPKS = [3, -1, -2, 2]


@pytest.mark.parametrize(
    ("model", "layout"),
    [
        (lambda: biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8, topks=TOPKS,
                                   n_win=2, side_dwconv=3, num_classes=0), "NHWC"),
        (lambda: biformer.BiFormerSTL(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8, topks=TOPKS,
                                      n_wins=2, side_dwconv=3, num_classes=0), "NHWC"),
        (lambda: biformer.BiFormerSTLNCHW(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8,
                                          topks=TOPKS, n_wins=2, side_dwconv=3, num_classes=0), "NCHW"),
        (lambda: BiFormerBackbone(dict(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8, topks=TOPKS,
                                       side_dwconv=3), n_win=2), "NHWC"),
    ],
    ids=["BiFormer", "BiFormerSTL", "BiFormerSTLNCHW", "BiFormerBackbone"],
)
def test_every_model_builds_the_chosen_mixers(model, layout):
    network = model()
    blocks = [stage[0] if isinstance(stage, torch.nn.Sequential) else stage.blocks[0] for stage in network.stages]
    for topk, block in zip(TOPKS, blocks):
        name, kwargs = choose_token_mixer(topk, layout=layout, num_heads=2, n_win=2, side_dwconv=3)
        assert type(block.attn) is TOKEN_MIXERS[name]
        assert block.attn.num_heads == kwargs["num_heads"]
        assert lepe_kernel(block.attn) == (kwargs["side_dwconv"] or None)  # 0: no LePE


def test_the_topk_rule_is_one_check_with_one_message():
    check_topk_fits(4, 2)  # exactly n_win ** 2 fits
    with pytest.raises(ValueError, match=r"^topk: expected at most n_win \*\* 2 = 4 regions, got 5$"):
        check_topk_fits(5, 2)
    with pytest.raises(ValueError, match=r"^n_win: 2 gives 4 regions, fewer than topk=5$"):
        check_topk_fits(5, 2, blame="n_win")
    # every layer and the dense backbone say it in the same words
    for build in (lambda: BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=5),
                  lambda: BiLevelRoutingAttentionNCHW(8, num_heads=2, n_win=2, topk=5),
                  lambda: biformer.BiFormer(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8, n_win=2,
                                            topks=[1, 5, 1, -2])):
        with pytest.raises(ValueError, match=r"^topk: expected at most n_win \*\* 2 = 4 regions, got 5$"):
            build()
    backbone = BiFormerBackbone(dict(depth=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], head_dim=8,
                                     topks=[1, 5, 1, -2]), n_win=3)
    with pytest.raises(ValueError, match=r"^n_win: 2 gives 4 regions, fewer than topk=5$"):
        backbone.set_n_win(2)
    assert BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=5, region_size=4).topk == 5  # grid follows input


@pytest.mark.parametrize("cls", [AttentionLePE, AttentionLePENCHW, BiLevelRoutingAttentionNCHW])
def test_the_head_split_rule_is_the_shared_check(cls):
    with pytest.raises(ValueError, match=r"^num_heads: dim \(12\) must be divisible by num_heads, got num_heads=8$"):
        cls(12, num_heads=8)
    with pytest.raises(ValueError, match=r"^num_heads: dim \(12\) and qk_dim \(16\) must be divisible"):
        BiLevelRoutingAttention(12, num_heads=8, qk_dim=16)
