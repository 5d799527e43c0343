"""The model contract of timm's own ``tests/test_models.py``, run over every registered ``biformer*`` model.

A new variant registered with timm inherits these checks. What is left out, and why (docs/timm.md):
- the checks that download weights (``test_model_load_pretrained``, ``test_model_features_pretrained``): the authors'
  links are broken and tests never use the network; loading a local file is tested in test_timm_integration.py;
- ``torch.jit.script`` (``test_model_forward_torchscript``, ``test_model_forward_fx_torchscript``): the models are not
  scriptable (the supported paths are torch.jit.trace, torch.export / ONNX and torch.compile); timm's own test suite
  excludes such families through its ``EXCLUDE_JIT_FILTERS`` list, and ``test_torchscript_is_excluded`` keeps that
  statement true.

To stay fast the inputs are smaller than timm's (the models take any size), and the four large variants are built
with one block per stage where a check builds a fresh model (the code paths are the same; only the repetition is
cut). Their full-depth structure is checked on the meta device (no memory, no init).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import create_feature_extractor, get_graph_node_names

import biformer  # noqa: F401  (registers the models)
from biformer._checks import is_tracing
from biformer.ops.cpu_kernels import ENV_VARIABLE as CPU_KERNELS
from biformer.ops.linear import ENV_VARIABLE as ONEDNN_LINEAR

MODEL_NAMES = timm.list_models("biformer*")
LARGE = {"biformer_base", "biformer_small", "biformer_stl", "biformer_stl_nchw"}
FWD_SIZE = (64, 64)  # timm: up to 384 (224 for these models)
BWD_SIZE = (64, 64)  # timm: 128
FEAT_SIZE = (64, 96)  # timm: 96 x 96; not square here, so H/W mix-ups show


def build(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with one block per stage for the large variants."""
    if name in LARGE:
        kwargs.setdefault("depth", [1, 1, 1, 1])
    return timm.create_model(name, **kwargs)


def test_every_registered_model_is_covered():
    assert set(MODEL_NAMES) == set(biformer.MODEL_NAMES) and len(MODEL_NAMES) == 6


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_cfg_names_real_parameters(name):
    """timm's test_model_default_cfgs, names part: ``classifier`` and ``first_conv`` are parameters of the model."""
    with torch.device("meta"):  # full depth, nothing allocated
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    keys = model.state_dict().keys()
    assert f"{cfg['classifier']}.weight" in keys and f"{cfg['first_conv']}.weight" in keys
    assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7)
    assert model.feature_info[-1]["num_chs"] == model.num_features


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_cfg_pooling_and_head_removal(name):
    """timm's test_model_default_cfgs: unpooled features at the default size match ``pool_size``; without the
    classifier the output is pooled (num_features); without pooling too it is the map again, whether removed by
    ``reset_classifier(0, '')`` or at construction (``num_classes=0, global_pool=''``)."""
    model = build(name).eval()
    pool_size = model.pretrained_cfg["pool_size"]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *model.pretrained_cfg["input_size"]))
        assert features.shape[-2:] == pool_size and features.shape[1] == model.num_features
        x = torch.randn(1, 3, *FWD_SIZE)  # the rest at a smaller size: a 2 x 2 map
        features = model.forward_features(x)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (1, model.num_features)
        torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features, atol=0, rtol=0)
        state = model.state_dict()
        bare = build(name, num_classes=0, global_pool="").eval()
        bare.load_state_dict(state)
        torch.testing.assert_close(bare(x), features, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward(name):
    """timm's test_model_forward (batch 1, no NaN)."""
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *FWD_SIZE))
    assert out.shape == (1, 1000) and not out.isnan().any()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward(name):
    """timm's test_model_backward: batch 2, 42 classes, every parameter gets a gradient."""
    model = build(name, num_classes=42).train()
    out = model(torch.randn(2, 3, *BWD_SIZE))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape == (2, 42) and not out.isnan().any()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("feature_cls", ["getter", "hook", "dict", "fx"])
def test_features_only(name, feature_cls, monkeypatch):
    """timm's test_model_forward_features / _intermediates_features, in every feature_cls: four NCHW maps with the
    channels and strides of feature_info, equal to forward_intermediates of the same weights."""
    # fx graphs run nn.Linear and the plain position-encoding conv; eager inference may run oneDNN's GEMM and the
    # fused CPU kernels (equal to float rounding, see tests/ops/test_linear.py and test_cpu_fused.py): the exact
    # comparison is of the same kernels
    monkeypatch.setenv(ONEDNN_LINEAR, "0")
    monkeypatch.setenv(CPU_KERNELS, "0")
    torch.manual_seed(0)
    features = build(name, features_only=True, feature_cls=feature_cls).eval()
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert len(channels) == 4 and reductions == [4, 8, 16, 32]
    x = torch.randn(1, 3, *FEAT_SIZE)
    with torch.no_grad():
        outputs = features(x)
    if feature_cls == "dict":
        assert list(outputs) == ["0", "1", "2", "3"]
        outputs = list(outputs.values())
    assert len(outputs) == 4
    for out, chs, r in zip(outputs, channels, reductions):
        assert out.shape[:2] == (1, chs) and not out.isnan().any()
        assert out.shape[2] <= math.ceil(FEAT_SIZE[0] / r) + 1 and out.shape[3] <= math.ceil(FEAT_SIZE[1] / r) + 1
    torch.manual_seed(0)
    plain = build(name).eval()  # the same weights: the same initialisation draws
    with torch.no_grad():
        expected = plain.forward_intermediates(x, intermediates_only=True)
    for out, reference in zip(outputs, expected):
        torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_intermediates(name):
    """timm's test_model_forward_intermediates: stage maps per feature_info, final output equal to forward_features,
    the same again with gradient checkpointing; and prune_intermediate_layers keeps what it returns."""
    model = build(name).eval()
    x = torch.randn(1, 3, *FEAT_SIZE)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
        for out, info in zip(intermediates, model.feature_info):
            assert out.shape[1] == info["num_chs"]
            assert out.shape[2] <= math.ceil(FEAT_SIZE[0] / info["reduction"]) + 1
        model.set_grad_checkpointing(True)
        checkpointed, _ = model.forward_intermediates(x)
        torch.testing.assert_close(checkpointed, final, rtol=1e-4, atol=1e-5)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and len(model.stages) == 2
        only = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        torch.testing.assert_close(only[1], intermediates[1], atol=0, rtol=0)
        assert model(x).shape[1] == model.feature_info[1]["num_chs"]  # pruned head: the stage-2 map


def _fx_model(model: nn.Module) -> nn.Module:
    """timm's _create_fx_model: trace with timm's leaf modules (timm's wrappers of torchvision's functions pass
    them), return the last node (the logits; one output in train and eval mode)."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes[-1] == eval_nodes[-1]
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_forward(name, monkeypatch):
    """timm's test_model_forward_fx: the traced model gives exactly the eager logits (with nn.Linear's kernel on
    both sides, as in test_features_only)."""
    monkeypatch.setenv(ONEDNN_LINEAR, "0")
    monkeypatch.setenv(CPU_KERNELS, "0")
    model = build(name).eval()
    x = torch.randn(1, 3, *FWD_SIZE)
    with torch.no_grad():
        expected = model(x)
        traced = _fx_model(model)
        out = torch.cat(tuple(traced(x).values()))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_backward(name):
    """timm's test_model_backward_fx: the traced training graph gives every parameter a gradient."""
    model = build(name, num_classes=42).train()
    traced = _fx_model(model)
    out = torch.cat(tuple(traced(torch.randn(2, 3, *BWD_SIZE)).values()))
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing and out.shape == (2, 42)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torchscript_is_excluded(name):
    """Not scriptable (documented in docs/timm.md, as timm's EXCLUDE_JIT_FILTERS does for such families): if this
    starts to pass, the models became scriptable and the docs and this test should say so."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    with pytest.raises(Exception):  # noqa: B017 - TorchScript's frontend raises several types
        torch.jit.script(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_meta_device_build_then_load(name):
    """``with torch.device("meta")`` builds without memory; ``to_empty`` + ``load_state_dict`` gives the logits of a
    normal build with the same weights."""
    reference = build(name, num_classes=5).eval()
    with torch.no_grad():  # non-default statistics so that a skipped buffer would show
        for key, tensor in reference.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    with torch.device("meta"):
        model = build(name, num_classes=5)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, *FWD_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=0, rtol=0)


def test_device_and_dtype_arguments():
    """timm >= 1.0.21: ``device=`` and ``dtype=`` at construction, for every parameter and floating buffer."""
    model = timm.create_model("biformer_nano", dtype=torch.bfloat16, num_classes=3).eval()
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    on_meta = timm.create_model("biformer_stl_nchw", device="meta")
    assert {t.device.type for t in on_meta.state_dict().values()} == {"meta"}
    with pytest.raises(ValueError, match=r"dtype: expected a floating-point torch.dtype, got torch.int64"):
        timm.create_model("biformer_nano", dtype=torch.int64)


@pytest.mark.parametrize("name", ["biformer_nano", "biformer_stl_nchw"])
def test_global_pool_types(name):
    """timm's pooling types at construction and in reset_classifier, against the plain formulas."""
    model = build(name, num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, *FEAT_SIZE)
    with torch.no_grad():
        fmap = model(x)
        avg, top = fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))
        expected = {"avg": avg, "max": top, "avgmax": 0.5 * (avg + top), "catavgmax": torch.cat([avg, top], 1)}
        for pool, value in expected.items():
            model.reset_classifier(0, pool)
            torch.testing.assert_close(model(x), value)
            assert model.forward_head(fmap, pre_logits=True).shape == value.shape
        model.reset_classifier(7, "catavgmax")
        assert model.head.in_features == 2 * model.num_features and model(x).shape == (2, 7)
        model.reset_classifier(4)  # None keeps the pooling
        assert model.head.in_features == 2 * model.num_features
    built = build(name, num_classes=3, global_pool="max")
    assert built.global_pool.pool_type == "max"
    with pytest.raises(ValueError, match=r"global_pool: expected one of \(.*'catavgmax'.*\), got 'mean'"):
        model.reset_classifier(3, "mean")
    with pytest.raises(ValueError, match="global_pool: expected one of"):
        build(name, global_pool="token")


SEEN: list[bool] = []  # module level: torch.export runs forward on a copy of the module's attributes


class _Recorder(nn.Module):
    """Records ``is_tracing`` as seen inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(is_tracing(x))
        return x * 2


def test_input_checks_are_skipped_only_while_tracing(tmp_path):
    """The eager error stays; fx, torch.jit.trace, torch.export and the ONNX exporter see no check."""
    model = timm.create_model("biformer_nano").eval()
    with pytest.raises(ValueError, match=r"BiFormer input: expected 3 channels on axis 1 \(NCHW\), got 4"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="BiFormer input: expected a torch.Tensor in NCHW layout, got list"):
        model([1, 2])
    traced = create_feature_extractor(model, return_nodes=["head"])
    assert not any("check" in str(node.target) for node in traced.graph.nodes)
    recorder, x = _Recorder(), torch.randn(1, 3, 8, 8)
    SEEN.clear()
    recorder(x)
    assert SEEN == [False]
    for trace in (
        lambda: torch.fx.symbolic_trace(recorder),
        lambda: torch.jit.trace(recorder, x, check_trace=False),  # its check re-runs forward eagerly
        lambda: torch.export.export(recorder, (x,)),
        lambda: torch.onnx.export(recorder, (x,), str(tmp_path / "r.onnx"), dynamo=False),
    ):
        SEEN.clear()
        trace()
        assert SEEN and all(SEEN)


def test_pretrained_without_weights_says_what_to_do(tmp_path, monkeypatch):
    """``pretrained=True`` with nothing to load: one line naming pretrained_cfg_overlay=dict(file=...)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty download cache
    with pytest.raises(ValueError, match=r"^pretrained: biformer_nano has no released weights; pass your own with "
                                         r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("biformer_nano", pretrained=True)
    # an unreachable link (port 9 of this machine refuses at once; the authors' real links are dead)
    overlay = dict(url="http://127.0.0.1:9/biformer_tiny.pth")
    with pytest.raises(RuntimeError, match=r"^pretrained: cannot download the weights of biformer_tiny from "
                                           r"http://127.0.0.1:9/biformer_tiny.pth \(.*\); download the file yourself "
                                           r"and pass pretrained_cfg_overlay=dict\(file=PATH\)$"):
        timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=overlay)
