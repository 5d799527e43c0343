"""The parts the model families share: one table of pretrained configs, the variants' model_args, one option name."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer
from biformer.models import MODEL_NAMES, RELEASED_MODEL_NAMES, Block
from biformer.models._base import default_cfgs


def test_every_registered_model_has_its_config_from_the_one_table():
    # the table and the entry points name the same models (a variant without a config, or the reverse, fails)
    assert sorted(timm.list_models("biformer*")) == sorted(default_cfgs) == sorted(MODEL_NAMES)
    assert RELEASED_MODEL_NAMES == tuple(name for name in MODEL_NAMES if name != "biformer_nano")
    for name in MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.architecture == name and cfg.first_conv == "downsample_layers.0.0" and cfg.classifier == "head"
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.crop_pct == 0.875
    assert timm.models.get_pretrained_cfg("biformer_nano").url == ""  # no released weights


def test_variants_take_the_class_defaults_and_their_model_args():
    nano = timm.create_model("biformer_nano", num_classes=0)
    assert [len(stage) for stage in nano.stages] == [1, 1, 2, 1] and nano.embed_dim == [32, 64, 128, 256]
    assert [stage[0].attn.num_heads for stage in nano.stages[:3]] == [2, 4, 8]  # head_dim 16
    assert [stage[0].attn.topk for stage in nano.stages[:3]] == [1, 4, 16]  # BiFormer's defaults
    assert nano.stages[0][0].attn.auto_pad and nano.stages[0][0].attn.n_win == 7
    # nano's q/k widths follow a changed embed_dim; the released variants keep theirs (as before)
    narrow = timm.create_model("biformer_nano", num_classes=0, embed_dim=[16, 32, 64, 128])
    assert narrow.stages[0][0].attn.qk_dim == 16
    tiny = biformer.BiFormer(num_classes=0)  # the class defaults are biformer_tiny's
    registered = timm.create_model("biformer_tiny", num_classes=0)
    assert [k for k in tiny.state_dict()] == [k for k in registered.state_dict()]
    assert not tiny.stages[0][0].attn.auto_pad and registered.stages[0][0].attn.auto_pad


def test_block_takes_attn_kwargs_and_the_former_name_with_a_warning():
    options = dict(dim=16, num_heads=2, topk=4, attn_type="window")
    block = Block(**options, attn_kwargs={"window": 3})
    with pytest.warns(DeprecationWarning, match="attn_kwargs"):
        former = Block(**options, attn_options={"window": 3})
    assert block.attn.window == former.attn.window == 3
    x = torch.randn(1, 16, 6, 6)
    assert former(x).shape == x.shape
    with pytest.raises(ValueError, match="attn_options: the former name of attn_kwargs; expected only attn_kwargs"):
        Block(**options, attn_kwargs={"window": 3}, attn_options={"window": 3})
