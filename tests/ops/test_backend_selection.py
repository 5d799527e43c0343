"""Which backend ``auto`` picks, pinned on a table of cases (the choices of the measured rule, see docs/bra.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from biformer import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW
from biformer.ops import attention_backend, available_backends, select_backend
from biformer.ops.backends import get_backend, register_backend, registry, resolve_backend, runs_whole_batch
from biformer.ops.functional import routed_attention, routed_attention_heads

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")  # device objects: no GPU needed

# The rule where the fused CPU kernels are not available (BIFORMER_CPU_KERNELS=0, no compiler): the PyTorch backends.
# (device, needs_grad, num_regions, topk, tokens_per_region) -> backend
CASES = [
    # BiFormer-T at 224 px: stages 1-3, inference then training (CPU)
    (CPU, False, 49, 1, 64, "gather"),
    (CPU, False, 49, 4, 16, "gather"),
    (CPU, False, 49, 16, 4, "dense"),
    (CPU, True, 49, 1, 64, "gather"),
    (CPU, True, 49, 4, 16, "gather"),
    (CPU, True, 49, 16, 4, "dense"),
    # large maps: never dense; in training sdpa above 2**20 scores per region
    (CPU, True, 49, 16, 400, "sdpa"),
    (CPU, False, 49, 1, 1369, "gather"),
    (CPU, True, 1, 1, 1024, "dense"),  # exactly 2**20 scores is not above the limit
    (CPU, True, 4, 1, 1025, "sdpa"),
    # the dense limits: at most 1024 tokens per image, at least a quarter of the regions routed
    (CPU, True, 16, 4, 64, "dense"),  # 1024 tokens, 4 of 16 routed
    (CPU, True, 16, 4, 65, "gather"),  # 1040 tokens
    (CPU, True, 16, 3, 64, "gather"),  # 3 of 16 < a quarter
    (CPU, True, 64, 16, 16, "dense"),  # 1024 tokens, a quarter
    (CPU, True, 64, 15, 16, "gather"),
    (CPU, True, 4, 1, 4, "dense"),
    (CPU, True, 1, 1, 1, "dense"),
    # inference takes dense under the same limits, else gather (never sdpa on CPU)
    (CPU, False, 16, 4, 64, "dense"),
    (CPU, False, 16, 4, 65, "gather"),
    (CPU, False, 16, 3, 64, "gather"),
    (CPU, False, 49, 16, 400, "gather"),
    # CUDA: sdpa for inference, gather for training, whatever the sizes
    (CUDA, False, 49, 4, 16, "sdpa"),
    (CUDA, True, 49, 4, 16, "gather"),
    (CUDA, True, 49, 16, 4, "gather"),
    (CUDA, True, 49, 16, 400, "gather"),
    (CUDA, False, 49, 16, 400, "sdpa"),
    # other devices follow the CPU rule
    (META, False, 49, 16, 4, "dense"),
    (META, False, 49, 4, 16, "gather"),
    (META, True, 49, 16, 4, "dense"),
    (META, True, 49, 16, 400, "sdpa"),
]


@pytest.mark.parametrize(("device", "needs_grad", "regions", "topk", "tokens", "expected"), CASES)
def test_auto_choice_is_pinned(without_cpu_kernels, device, needs_grad, regions, topk, tokens, expected):
    chosen = select_backend(
        num_regions=regions, topk=topk, tokens_per_region=tokens, device=device, needs_grad=needs_grad
    )
    assert chosen == expected


# Where the kernels are built, the CPU rule takes them in float32 and bfloat16 at every size, inference and training;
# other dtypes and devices keep the rule above. (device, needs_grad, regions, topk, tokens, dtype) -> backend
CASES_WITH_KERNELS = [
    (CPU, False, 49, 1, 64, torch.float32, "cpu_fused"),
    (CPU, False, 49, 4, 16, torch.bfloat16, "cpu_fused"),
    (CPU, False, 49, 16, 4, None, "cpu_fused"),  # no dtype given: not checked
    (CPU, True, 49, 1, 64, torch.float32, "cpu_fused"),
    (CPU, True, 49, 16, 4, torch.bfloat16, "cpu_fused"),
    (CPU, True, 49, 16, 400, torch.float32, "cpu_fused"),  # its backward keeps no scores either
    (CPU, False, 49, 1, 1369, torch.float32, "cpu_fused"),
    (CPU, False, 49, 16, 4, torch.float64, "dense"),
    (CPU, True, 49, 4, 16, torch.float64, "gather"),
    (CPU, False, 49, 4, 16, torch.float16, "gather"),
    (CUDA, False, 49, 4, 16, torch.float32, "sdpa"),
    (CUDA, True, 49, 16, 4, torch.float32, "gather"),
    (META, False, 49, 16, 4, torch.float32, "dense"),
]


@pytest.mark.parametrize(("device", "needs_grad", "regions", "topk", "tokens", "dtype", "expected"),
                         CASES_WITH_KERNELS)
def test_auto_choice_with_the_cpu_kernels_is_pinned(with_cpu_kernels, device, needs_grad, regions, topk, tokens,
                                                     dtype, expected):
    chosen = select_backend(
        num_regions=regions, topk=topk, tokens_per_region=tokens, device=device, needs_grad=needs_grad, dtype=dtype
    )
    assert chosen == expected


# --- names, the default, the flags -----------------------------------------------------------------------
SIZES = dict(num_regions=49, topk=16, tokens_per_region=4, device=CPU, needs_grad=True)  # auto: dense


def test_names_and_the_default_resolve_once_to_a_concrete_backend(without_cpu_kernels):
    for name in available_backends()[1:]:
        assert select_backend(name, **SIZES) == name
        assert resolve_backend(name, **SIZES) is get_backend(name)
    assert select_backend(None, **SIZES) == "dense"  # the default is auto
    with attention_backend("reference"):
        assert select_backend(None, **SIZES) == "reference"
        assert select_backend("", **SIZES) == "reference"
        assert select_backend(**SIZES) == "dense"  # select_backend's own default is auto, not the global one
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'reference'.* or None, got 'fast'"):
        select_backend("fast", **SIZES)
    with pytest.raises(ValueError, match="backend: expected one of .*, got 'auto'"):
        get_backend("auto")


def test_auto_reads_the_capability_flags(without_cpu_kernels, monkeypatch):
    dense, sdpa = get_backend("dense"), get_backend("sdpa")
    large = dict(SIZES, tokens_per_region=400)  # training on a large map: sdpa
    assert select_backend(**large, dtype=torch.float32) == "sdpa"
    monkeypatch.setitem(registry._BACKENDS, "sdpa", dataclasses.replace(sdpa, dtypes=(torch.float16,)))
    assert select_backend(**large, dtype=torch.float32) == "gather"
    assert select_backend(**large, dtype=torch.float16) == "sdpa"
    assert select_backend(**large) == "sdpa"  # no dtype given: not checked
    monkeypatch.setitem(registry._BACKENDS, "dense", dataclasses.replace(dense, devices=("cuda",)))
    assert select_backend(**SIZES) == "gather"
    monkeypatch.setitem(registry._BACKENDS, "dense", dataclasses.replace(dense, gradients=False))
    assert select_backend(**SIZES) == "gather"
    monkeypatch.setitem(registry._BACKENDS, "dense", dataclasses.replace(dense, max_head_dim=16))
    assert select_backend(**SIZES, head_dim=16) == "dense"
    assert select_backend(**SIZES, head_dim=32) == "gather"
    monkeypatch.setitem(registry._BACKENDS, "dense", dataclasses.replace(dense, auto=False))
    assert select_backend(**SIZES) == "gather"


def test_registered_flags():
    layouts = {name: get_backend(name).layout for name in available_backends()[1:]}
    assert layouts == {name: "heads" for name in layouts} | {"reference": "regions"}
    assert [name for name in available_backends()[1:] if get_backend(name).auto] == [
        "gather", "sdpa", "dense", "cpu_fused"
    ]
    assert [name for name in available_backends()[1:] if get_backend(name).whole_batch] == ["reference"]
    triton = get_backend("triton")
    assert triton.devices == ("cuda",) and triton.max_head_dim == 256 and torch.float64 not in triton.dtypes
    assert runs_whole_batch("reference") and not runs_whole_batch("auto") and not runs_whole_batch(None)
    with attention_backend("reference"):
        assert runs_whole_batch(None) and not runs_whole_batch("gather")


def test_register_backend_refuses_bad_names_and_layouts():
    with pytest.raises(ValueError, match="name: expected a new backend name, got 'gather' \\(taken\\)"):
        register_backend("gather")
    with pytest.raises(ValueError, match="name: expected a new backend name, got 'auto'"):
        register_backend("auto")
    with pytest.raises(ValueError, match=r"layout: expected one of \('regions', 'heads'\), got 'tokens'"):
        register_backend("mine", layout="tokens")
    with pytest.raises(ValueError, match=r"capabilities: unknown flag\(s\) \['device'\]; known: \('auto', 'devices'"):
        register_backend("mine", device="cpu")
    assert "mine" not in available_backends()


# --- resolved once per call ------------------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """Counts of select_backend calls and of reads of the global default."""
    counts = {"select": 0, "default": 0}
    select, default = registry.select_backend, registry.get_default_backend

    def counting_select(*args, **kwargs):
        counts["select"] += 1
        return select(*args, **kwargs)

    def counting_default():
        counts["default"] += 1
        return default()

    monkeypatch.setattr(registry, "select_backend", counting_select)
    monkeypatch.setattr(registry, "get_default_backend", counting_default)
    return counts


@pytest.mark.parametrize("backend", [None, "reference", "gather", "dense"])
@pytest.mark.parametrize("grad", [False, True])
def test_layers_resolve_the_backend_once_per_forward(counted, backend, grad):
    torch.manual_seed(0)
    layers = [
        (BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2, backend=backend), torch.randn(2, 4, 4, 16)),
        (BiLevelRoutingAttentionNCHW(16, num_heads=2, n_win=2, topk=2, backend=backend), torch.randn(2, 16, 4, 4)),
    ]
    for layer, x in layers:
        counted.update(select=0, default=0)
        with torch.set_grad_enabled(grad):
            layer(x)
        assert counted == {"select": 1, "default": int(backend is None)}


def test_the_op_runs_a_resolved_backend_as_given_and_resolves_a_name_once(counted, monkeypatch):
    query, key, value = (torch.randn(2, 1, 4, 3, 8) for _ in range(3))
    topk_index = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    seen = []
    chosen = dataclasses.replace(get_backend("gather"), function=lambda *a, **k: seen.append(1) or a[0])
    routed_attention_heads(query, key, value, topk_index, scale=0.5, backend=chosen)
    routed_attention(query[0], torch.cat([key[0], value[0]], -1), topk_index, num_heads=1, scale=0.5, backend=chosen)
    assert seen == [1, 1] and counted == {"select": 0, "default": 0}
    routed_attention_heads(query, key, value, topk_index, scale=0.5)
    assert counted == {"select": 1, "default": 1}


def test_layer_backend_is_checked_when_assigned_and_says_whether_the_batch_may_be_split():
    for layer in (BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2),
                  BiLevelRoutingAttentionNCHW(16, num_heads=2, n_win=2, topk=2)):
        assert layer.backend is None and not layer.needs_whole_batch
        with attention_backend("reference"):
            assert layer.needs_whole_batch
        layer.backend = "reference"
        assert layer.needs_whole_batch
        layer.backend = "gather"
        layer.routing_sink = ({}, "layer")
        assert layer.needs_whole_batch
        with pytest.raises(ValueError, match="backend: expected one of .* or None, got 'fast'"):
            layer.backend = "fast"
        assert layer.backend == "gather"
