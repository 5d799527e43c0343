"""biformer.chosen_backends: the backend each BRA module's forward runs, as the forward itself resolves it."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer
from biformer.ops import select_backend


def small_model():
    torch.manual_seed(0)
    return timm.create_model("biformer_nano", num_classes=3)


def test_reports_what_auto_selects_for_each_stage_shape():
    model = small_model().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        chosen = biformer.chosen_backends(model, images)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, biformer.BiLevelRoutingAttention)}
    assert list(chosen) == list(layers) and layers
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: captured.__setitem__(n, a[0].shape))
             for n, m in layers.items()]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        _, height, width, _ = captured[name]
        grid = layer.n_win
        expected = select_backend(
            num_regions=grid * grid, topk=min(layer.topk, grid * grid),
            tokens_per_region=(-(-height // grid)) * (-(-width // grid)), device=torch.device("cpu"),
            needs_grad=False, dtype=torch.float32, head_dim=max(layer.qk_dim, layer.dim) // layer.num_heads,
        )
        assert chosen[name] == expected


def test_follows_the_default_and_the_gradient_mode_and_leaves_no_hook(without_cpu_kernels):
    model = small_model()
    images = torch.randn(2, 3, 64, 64)
    with biformer.attention_backend("sdpa"):
        assert set(biformer.chosen_backends(model, images).values()) == {"sdpa"}
    assert not any(m._forward_pre_hooks for m in model.modules())
    layer = biformer.BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=16, side_dwconv=5)
    x = torch.randn(1, 14, 14, 64)  # stage 3 of biformer_tiny at 224 px: dense in inference and training
    with torch.no_grad():
        assert layer.backend_for(x) == "dense"
    assert layer.backend_for(x) == "dense"
    x = torch.randn(1, 140, 140, 64)  # 20 x 20 tokens per region: gather in inference, sdpa in training
    with torch.no_grad():
        assert layer.backend_for(x) == "gather"
    assert layer.backend_for(x) == "sdpa"


def test_refuses_what_holds_no_bra_module():
    with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):
        biformer.chosen_backends("biformer_nano", torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"model: expected a model holding BiLevelRoutingAttention \(NHWC\) "
                                         r"modules, got a Linear without any"):
        biformer.chosen_backends(torch.nn.Linear(4, 4), torch.randn(2, 4))
