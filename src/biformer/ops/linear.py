"""Linear layers in CPU inference (float32, and bfloat16 autocast) through oneDNN's GEMM, with the bias and an
optional GELU fused in.

PyTorch runs a float32 ``nn.Linear`` on CPU as MKL's ``addmm`` (a copy of the bias into the output, then the
GEMM) and GELU as a second pass over the output. On the AMD EPYC CPUs measured, oneDNN's GEMM
(``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` emits for linears on CPU) was faster at
every BiFormer shape, and fusing GELU spares one pass over the MLP's widest tensor: a biformer_small forward
1.10-1.17x faster at batch 1 and 1.07-1.11x at batch 8 (``benchmarks/bench_linear.py``; swin_tiny gains
1.06-1.12x from the same swap, so this is a faster GEMM for BiFormer's users, not a lighter model). The weight
is used as it is (no kept copy: no extra memory, nothing to invalidate); the outputs match ``nn.Linear``'s to
float rounding (another summation order).

Under CPU bfloat16 autocast the GEMM is oneDNN's either way, but autocast's ``addmm`` still copies the bias into
the output first, runs GELU as a second pass, and casts every weight to bfloat16 again in each autocast context
(once per forward where, as usual, each call has its own ``with torch.autocast(...)``). Here the input is cast
as autocast would cast it, the bias and GELU are fused, and each layer's bfloat16 weight and bias are kept (in
a table keyed weakly by the weight, so they go with the model; made again when the weight or bias changes:
another tensor, new data, an in-place update): biformer_small 1.02-1.21x at batch 1 and 1.07x at batch 8
(swin_tiny gains as much from kept weights). The kept copies cost half the float32 size of the layers they
cover (about 46 MB for biformer_small); :func:`clear_kept_weights` hands them back. Outputs match autocast's
to bfloat16 rounding (GELU here is taken before the rounding, not after it).

:func:`linear` takes oneDNN's path only where all of these hold, and is ``layer(x)`` (then ``F.gelu``) elsewhere:

- no gradient is needed (inference); the tensors are on CPU and either float32 with autocast off, or float32 or
  bfloat16 inputs with float32 parameters under CPU bfloat16 autocast on a CPU with oneDNN's bfloat16 kernels
  (parameters made under ``torch.inference_mode`` have no version to follow: they keep autocast's call);
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
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

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


@functools.cache
def _bf16_available() -> bool:
    """Whether oneDNN runs bfloat16 GEMMs natively on this CPU (else it emulates them, slowly)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return _available() and check is not None and bool(check())


# weight Parameter -> (weakref to the bias, the parameters' (version, data_ptr), bf16 weight, bf16 bias or None)
_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_kept_weights() -> None:
    """Drop every kept bfloat16 weight (see the module doc); the next autocast call makes them again.

    An entry lives as long as its weight Parameter. A model converted in place afterwards (``model.bfloat16()``
    keeps the Parameter objects) no longer uses its entries but keeps them until this call or its deletion."""
    _KEPT.clear()


def _kept_bf16(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias in bfloat16 (autocast's casts), made once per version of them."""
    weight, bias = layer.weight, layer.bias
    state = (weight._version, weight.data_ptr(), None if bias is None else (bias._version, bias.data_ptr()))
    kept = _KEPT.get(weight)
    if kept is not None and kept[0]() is bias and kept[1] == state:
        return kept[2], kept[3]
    with torch.no_grad():
        weight_bf16 = weight.detach().to(torch.bfloat16)
        bias_bf16 = None if bias is None else bias.detach().to(torch.bfloat16)
    _KEPT[weight] = ((lambda: None) if bias is None else weakref.ref(bias), state, weight_bf16, bias_bf16)
    return weight_bf16, bias_bf16


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
    if is_tracing(x) or x.device.type != "cpu" or x.dim() < 2:
        return False
    autocast = torch.is_autocast_enabled("cpu")
    if autocast:
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.dtype != torch.float32:
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
                                       or (grad and tensor.requires_grad) or (autocast and tensor.is_inference())):
                return False
        features = layer.out_features
    return (_bf16_available() if autocast else _available()) and onednn_linear_enabled()


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
    rows = x.reshape(-1, x.shape[-1])  # (M, in_features); a view for the models' contiguous maps
    if torch.is_autocast_enabled("cpu"):  # bfloat16 autocast (takes_onednn_path): autocast's casts, kept weights
        weight, bias = _kept_bf16(layer)
        rows = rows.to(torch.bfloat16)
    else:
        weight, bias = layer.weight, layer.bias
    # oneDNN's names: "gelu" with algorithm "none" is the exact (erf) GELU of nn.GELU()
    attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
    out = _pointwise(rows.contiguous(), weight, bias, attr, [], algorithm)  # (M, out_features)
    return out.view(*x.shape[:-1], out.shape[-1])
