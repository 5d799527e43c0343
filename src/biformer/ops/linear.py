"""Linear layers in CPU float32 inference through oneDNN's GEMM, with the bias and an optional GELU fused in.

PyTorch runs a float32 ``nn.Linear`` on CPU as MKL's ``addmm`` (a copy of the bias into the output, then the
GEMM) and GELU as a second pass over the output. On the AMD EPYC CPUs measured, oneDNN's GEMM
(``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` emits for linears on CPU) was faster at
every BiFormer shape, and fusing GELU spares one pass over the MLP's widest tensor: a biformer_small forward
1.10-1.17x faster at batch 1 and 1.07-1.11x at batch 8 (``benchmarks/bench_linear.py``; swin_tiny gains
1.06-1.12x from the same swap, so this is a faster GEMM for BiFormer's users, not a lighter model). The weight
is used as it is (no kept copy: no extra memory, nothing to invalidate); the outputs match ``nn.Linear``'s to
float rounding (another summation order).

:func:`linear` takes oneDNN's path only where all of these hold, and is ``layer(x)`` (then ``F.gelu``) elsewhere:

- no gradient is needed (inference), the tensors are float32 on CPU and autocast is off;
- eager mode (not ``torch.compile``, export or tracing: the compiler picks its own kernels);
- the layer is a plain ``nn.Linear`` with no forward hooks (so a subclass, an adapter, a parametrization or a
  feature hook always sees its own call);
- this torch build has oneDNN and the operator;
- ``BIFORMER_ONEDNN_LINEAR`` is ``1``, or it is unset and the CPU is one where the path was measured faster
  (:func:`cpu_prefers_onednn`: an AMD CPU with AVX-512). ``0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import is_tracing

ENV_VARIABLE = "BIFORMER_ONEDNN_LINEAR"
ACTIVATIONS = (None, "gelu")


def cpu_prefers_onednn(cpuinfo: str) -> bool:
    """Whether ``cpuinfo`` (the text of ``/proc/cpuinfo``) describes a CPU where oneDNN's float32 GEMM was
    measured faster than MKL's for BiFormer's linears: an AMD CPU with AVX-512 (``avx512f``)."""
    vendor = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = value
    return vendor == "AuthenticAMD" and "avx512f" in flags.split()


@functools.cache
def _machine_prefers_onednn() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            return cpu_prefers_onednn(file.read())
    except OSError:  # not Linux: keep nn.Linear
        return False


def onednn_linear_enabled() -> bool:
    """Whether the oneDNN path is on for this process (``BIFORMER_ONEDNN_LINEAR``, else the CPU rule)."""
    setting = os.environ.get(ENV_VARIABLE)
    if setting is None or setting == "":
        return _machine_prefers_onednn()
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV_VARIABLE}: expected 0 (off), 1 (on) or unset (the CPU's default), got {setting!r}")
    return setting == "1"


def _pointwise(*args: object) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


@functools.cache
def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def runs_as_written(module: nn.Module) -> bool:
    """Whether calling ``module`` does nothing beyond its own ``forward``: no forward hooks (its own or global:
    feature taps, pruning masks) that a direct call of the operator would skip."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(nn.modules.module, "_global_forward_hooks", None)
        or getattr(nn.modules.module, "_global_forward_pre_hooks", None)
    )


def takes_onednn_path(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether :func:`linear` runs oneDNN's fused GEMM now for ``x`` and each of ``layers`` in turn (``x`` the
    first one's input; see the module doc). Only a plain ``nn.Linear`` without hooks does (a subclass, a
    parametrized or quantized layer, an adapter keep their own call)."""
    if is_tracing(x) or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    features = x.shape[-1]
    for layer in layers:
        if type(layer) is not nn.Linear or not runs_as_written(layer) or layer.in_features != features:
            return False
        for tensor in (layer.weight, layer.bias):
            if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"
                                       or (grad and tensor.requires_grad)):
                return False
        features = layer.out_features
    return _available() and onednn_linear_enabled()


def linear(x: torch.Tensor, layer: nn.Module, activation: str | None = None) -> torch.Tensor:
    """``layer(x)``, then GELU when ``activation == "gelu"``: (..., in_features) -> (..., out_features).

    Through oneDNN with the bias and the activation fused where :func:`takes_onednn_path` holds.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if not takes_onednn_path(x, layer):
        out = layer(x)
        return F.gelu(out) if activation == "gelu" else out
    return onednn_linear(x, layer, activation)


def onednn_linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
    """:func:`linear`'s oneDNN path without its checks, for a caller that has made them once
    (:func:`takes_onednn_path`, a valid ``activation``): (..., in_features) -> (..., out_features)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in_features); a view for the models' contiguous maps
    # oneDNN's names: "gelu" with algorithm "none" is the exact (erf) GELU of nn.GELU()
    attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
    out = _pointwise(rows, layer.weight, layer.bias, attr, [], algorithm)  # (M, out_features)
    return out.view(*x.shape[:-1], out.shape[-1])
