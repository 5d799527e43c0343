"""timm-native behaviour: create_model, pretrained files, features_only, intermediates, head, checkpointing."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer

SMALL = dict(num_classes=7)


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("biformer_tiny", num_classes=5).eval()


def test_pretrained_cfg_preprocessing(tiny):
    cfg = timm.data.resolve_data_config({}, model=tiny)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    for name in biformer.RELEASED_MODEL_NAMES:
        assert timm.models.get_pretrained_cfg(name).url.startswith("https://")


@pytest.mark.parametrize("name", biformer.MODEL_NAMES)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_round_trip(name, suffix, tmp_path):
    """A file written in the authors' format (or safetensors) loads back through timm.create_model."""
    source = timm.create_model(name).eval()
    with torch.no_grad():  # make BatchNorm statistics non-trivial
        for buffer_name, buffer in source.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    path = biformer.save_weights(source, tmp_path / f"weights{suffix}")
    if suffix == ".pth":
        assert set(torch.load(path, weights_only=True)) == {"model"}
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)


def test_pretrained_with_new_head_and_drop_path(tmp_path):
    source = timm.create_model("biformer_tiny").eval()
    # The authors' files may come from DistributedDataParallel: 'module.' prefixes.
    state = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(state, tmp_path / "authors.pth")
    model = timm.create_model("biformer_tiny", pretrained=True, num_classes=10, drop_path_rate=0.1,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "authors.pth")))
    assert model.head.out_features == 10
    torch.testing.assert_close(model.stages[2][3].attn.qkv.qkv.weight, source.stages[2][3].attn.qkv.qkv.weight)
    assert model.stages[2][3].drop_path.drop_prob > 0


@pytest.mark.parametrize("name", biformer.MODEL_NAMES)
def test_forward_backward_every_variant(name):
    model = timm.create_model(name, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", biformer.MODEL_NAMES)
@pytest.mark.parametrize("size", [(97, 131), (224, 160), (40, 33)])
def test_any_input_size(name, size):
    model = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 7)


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw"])
def test_features_only(name):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    features = model(torch.randn(1, 3, 96, 80))
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [tuple(f.shape[2:]) for f in features][0][0] in (24, 24)
    picked = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert len(picked(torch.randn(1, 3, 64, 64))) == 2
    assert picked.feature_info.channels() == model.feature_info.channels()[1::2]


def test_forward_intermediates_matches_forward(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = tiny.forward_intermediates(x)
        torch.testing.assert_close(tiny.forward_head(final), tiny(x))
        assert [t.shape[1] for t in intermediates] == [64, 128, 256, 512]
        assert [t.shape[-1] for t in intermediates] == [16, 8, 4, 2]
        only = tiny.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(only[1], intermediates[2])
        assert tiny.forward_head(final, pre_logits=True).shape == (2, 512)


def test_reset_classifier_and_no_weight_decay():
    model = timm.create_model("biformer_small").eval()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip and skip <= set(names)
    assert all("pos_embed" in n for n in skip)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_grad_checkpointing_gives_the_same_gradients():
    model = timm.create_model("biformer_tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for expected, parameter in zip(plain, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected, atol=1e-5, rtol=1e-4)


def test_drop_rate_is_applied_in_training():
    model = timm.create_model("biformer_tiny", num_classes=3, drop_rate=0.5)
    assert model.head_drop.p == 0.5


@pytest.mark.parametrize("name", ["biformer_stl", "biformer_stl_nchw"])
def test_stl_factories_accept_overrides(name):
    model = timm.create_model(name, topks=[2, 4, 8, -1], n_wins=[7, 7, 7, 7], num_classes=2)
    assert model.stages[0].blocks[0].attn.topk == 2
