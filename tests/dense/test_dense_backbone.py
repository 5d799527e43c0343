"""BiFormerBackbone: stage maps at any size, the authors' dense extras, freezing, and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from dense_helpers import TINY

import biformer
from biformer.dense import BiFormerBackbone, load_backbone_weights
from conftest import fixture_state_dict, load_fixture, load_manifest


def channel_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain float64 LayerNorm over the channels of an NCHW map (weight 1, bias 0)."""
    x = x.double()
    mean = x.mean(dim=1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps)


@pytest.mark.parametrize("size", [(97, 131), (33, 64), (224, 224)])
def test_stage_maps_at_any_size(size):
    backbone = BiFormerBackbone(TINY, n_win=4).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *size))
    expected = [(2, c, -(-size[0] // s), -(-size[1] // s)) for c, s in zip([32, 32, 64, 64], [4, 8, 16, 32])]
    assert [tuple(m.shape) for m in maps] == expected
    assert backbone.channels == [32, 32, 64, 64] and backbone.strides == [4, 8, 16, 32]


def test_out_indices_select_stages():
    backbone = BiFormerBackbone(TINY, n_win=2, out_indices=(1, 3))
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [32, 64] and backbone.strides == [8, 32]


def test_every_parameter_gets_a_finite_gradient():
    backbone = BiFormerBackbone(TINY, n_win=2)
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 45, 70))).backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_authors_classification_weights_give_their_stage_outputs_layer_normalised():
    """The authors' micro classifier (head and norm dropped) reproduces their stage outputs, each passed
    through the extra LayerNorm (initialised to the identity affine map)."""
    tensors, meta = load_fixture("biformer_micro")
    backbone = BiFormerBackbone(meta["constructor_kwargs"], n_win=7).eval()
    report = load_backbone_weights(backbone, fixture_state_dict(tensors))
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.num_batches_tracked",
                                      "norm.running_mean", "norm.running_var", "norm.weight"]
    assert sorted(report.missing) == sorted(f"extra_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.unexpected == []
    with torch.no_grad():
        maps = backbone(tensors["input"])
    for i, stage_map in enumerate(maps):
        expected = channel_layer_norm(tensors[f"stage_outputs.{i}"]).float()
        torch.testing.assert_close(stage_map, expected, atol=2e-4, rtol=2e-4)


def test_keys_are_the_authors_dense_backbone_keys():
    """biformer_tiny's backbone = the authors' classification keys without head/norm, plus extra_norms."""
    backbone = BiFormerBackbone("biformer_tiny", n_win=16)
    classification = [key for key, _ in load_manifest("biformer_tiny")["state_dict"]]
    expected = [k for k in classification if not k.startswith(("head.", "norm."))]
    expected += [f"extra_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert list(backbone.state_dict()) == expected


def test_our_classification_file_loads_with_the_head_dropped(tmp_path):
    classifier = biformer.BiFormer(**TINY, num_classes=7, auto_pad=True)
    path = biformer.save_weights(classifier, tmp_path / "classifier.safetensors")
    backbone = BiFormerBackbone(TINY, n_win=2, checkpoint=path)
    assert {k.split(".")[0] for k in backbone.load_report.dropped} == {"head", "norm"}
    assert "extra_norms" in str(backbone.load_report) and "dropped 7" in str(backbone.load_report)
    torch.testing.assert_close(backbone.stages[2][0].attn.wo.weight, classifier.stages[2][0].attn.wo.weight)


def test_dense_checkpoint_with_backbone_prefix_loads(tmp_path):
    source = BiFormerBackbone(TINY, n_win=2)
    nn.init.normal_(source.extra_norms[3].weight)
    mmdet_style = {"state_dict": {**{f"backbone.{k}": v for k, v in source.state_dict().items()},
                                  "neck.lateral_convs.0.conv.weight": torch.zeros(8, 32, 1, 1)}}
    torch.save(mmdet_style, tmp_path / "maskrcnn.pth")
    target = BiFormerBackbone(TINY, n_win=2)
    report = load_backbone_weights(target, tmp_path / "maskrcnn.pth")
    assert report.missing == [] and report.dropped == ["neck.lateral_convs.0.conv.weight"]
    torch.testing.assert_close(target.extra_norms[3].weight, source.extra_norms[3].weight)


def test_checkpoint_errors(tmp_path):
    backbone = BiFormerBackbone(TINY, n_win=2)
    other = BiFormerBackbone(dict(TINY, embed_dim=[32, 64, 64, 64], qk_dims=[32, 64, 64, 64]), n_win=2)
    with pytest.raises(ValueError, match="shapes differ"):
        load_backbone_weights(backbone, other.state_dict())
    with pytest.raises(ValueError, match="no key matches"):
        load_backbone_weights(backbone, {"conv1.weight": torch.zeros(3)})
    partial = {k: v for k, v in backbone.state_dict().items() if not k.startswith("stages.3")}
    with pytest.raises(ValueError, match=r"missing from the file: stages\.3"):
        load_backbone_weights(backbone, partial)
    assert load_backbone_weights(backbone, partial, strict=False).missing[0].startswith("stages.3")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(backbone, tmp_path / "absent.pth")


def test_batch_norm_eval_keeps_running_statistics_and_trains_affine():
    backbone = BiFormerBackbone(TINY, n_win=2, batch_norm="eval").train()
    stem_norm = backbone.downsample_layers[0][1]
    before = stem_norm.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32) * 3 + 1)
    assert torch.equal(stem_norm.running_mean, before) and not stem_norm.training
    assert stem_norm.weight.requires_grad and backbone.stages[0].training


def test_batch_norm_frozen_replaces_batch_norms():
    backbone = BiFormerBackbone(TINY, n_win=2, batch_norm="frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert not any("downsample_layers.0.1" in name for name, _ in backbone.named_parameters())
    backbone.load_state_dict(BiFormerBackbone(TINY, n_win=2).state_dict())  # same keys (num_batches_tracked dropped)


def test_frozen_stages_get_no_gradient_and_stay_in_eval():
    backbone = BiFormerBackbone(TINY, n_win=2, frozen_stages=2).train()
    frozen = [backbone.downsample_layers[i] for i in range(2)] + [backbone.stages[i] for i in range(2)]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen) and backbone.stages[2].training
    assert all(p.requires_grad for p in backbone.stages[2].parameters())


def test_n_win_and_region_sizes_set_the_region_grid():
    backbone = BiFormerBackbone(TINY, n_win=2, region_sizes=[None, 4, None, None])
    image = torch.randn(1, 3, 96, 160)  # stage maps 24x40, 12x20, 6x10
    with biformer.record_routing(backbone) as routing, torch.no_grad():
        backbone(image)
    assert routing["stages.0.0.attn"].shape[1] == 4  # n_win 2: 2 x 2 regions
    assert routing["stages.1.0.attn"].shape[1] == 3 * 5  # regions of 4 x 4 tokens on 12 x 20
    backbone.set_n_win(3)
    with biformer.record_routing(backbone) as routing, torch.no_grad():
        backbone(image)
    assert routing["stages.0.0.attn"].shape[1] == 9 and routing["stages.1.0.attn"].shape[1] == 15


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_norm="sync"), "batch_norm"),
        (dict(frozen_stages=5), "frozen_stages"),
        (dict(out_indices=(2, 1)), "out_indices"),
        (dict(out_indices=()), "out_indices"),
        (dict(variant="resnet50"), "variant"),
        (dict(variant="biformer_stl"), "variant"),
        (dict(variant=3), "variant"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"variant": TINY, **kwargs}
    with pytest.raises(ValueError, match=message):
        BiFormerBackbone(kwargs.pop("variant"), **kwargs)


def test_bad_inputs():
    backbone = BiFormerBackbone(TINY, n_win=2)
    with pytest.raises(ValueError, match="expected 3 channels"):
        backbone(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="n_win"):
        backbone.set_n_win(1)  # topk 4 does not fit in 1 region
    with pytest.raises(ValueError, match="n_win"):
        backbone.set_n_win(0)
