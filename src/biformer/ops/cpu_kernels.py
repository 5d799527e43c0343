"""The fused CPU kernels of routed attention: C++ (``csrc/routed_attention.cpp``), built on first use and cached.

The kernels compute BRA's token-to-token attention without gathering anything: for each image, query region and
head they read the routed regions' keys and values where they lie (the BRA projection's NHWC output, channel
slices of it, or the head-major layout), run the products, softmax and weighted sum in float32 registers, and
write the output (plus the local-context map, when given) in the layout the caller wants. The backward recomputes
the scores from the saved log-sum-exp and sums every key's gradient over the query regions in a fixed order: no
score tensor is stored and the result is deterministic. Inputs float32 or bfloat16 (products and sums in float32).

Building. The first use in a process compiles the source with PyTorch's C++ extension tools
(``torch.utils.cpp_extension.load``) for this CPU's vector width (AVX-512, AVX2 or plain C++, as
``torch.backends.cpu.get_cpu_capability()`` reports it) and the installed torch; one line on stderr says so (about
30 seconds on 2 cores). The library is cached in PyTorch's extension folder (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and later processes load it in a moment. It needs a C++ compiler (``$CXX`` or
``c++``) and ``ninja`` (a dependency of biformer). Where either is missing or the build fails, one warning names
the reason and BRA runs its PyTorch backends (the same function, slower).

``BIFORMER_CPU_KERNELS``: unset or empty (default) builds and uses the kernels where they build; ``0`` never builds
or uses them; ``1`` requires them (a failed build raises instead of warning). Any other value: ``ValueError``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

ENV_VARIABLE = "BIFORMER_CPU_KERNELS"
SOURCE = Path(__file__).resolve().parent / "csrc" / "routed_attention.cpp"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

# Compiler flags per vector width (the ones ATen builds its own AVX2 / AVX-512 kernels with).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}


def kernels_setting() -> str | None:
    """``BIFORMER_CPU_KERNELS`` read now: None (unset or empty: automatic), ``"0"`` or ``"1"``."""
    value = os.environ.get(ENV_VARIABLE, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VARIABLE}: expected 0, 1 or unset, got {value!r}")
    return value


def cpu_capability() -> str:
    """The vector width the kernels are compiled for: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"`` (torch's own
    dispatch level on this CPU; other reports, such as ARM's, take the plain C++ build)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def has_bf16_dot_products() -> bool:
    """Whether the bfloat16 products run as AVX512-BF16 dot products (VDPBF16PS) on this CPU."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return cpu_capability() == "AVX512" and check is not None and bool(check())


def _compile_flags() -> list[str]:
    flags = ["-O3", *_CAPABILITY_FLAGS[cpu_capability()]]
    if has_bf16_dot_products():
        flags += ["-mavx512bf16", "-DBIFORMER_AVX512_BF16"]
    return flags


def extension_name() -> str:
    """The cached library's name: one per torch version and instruction set (a library built for another torch
    would not load)."""
    version = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    isa = cpu_capability().lower() + ("_bf16" if has_bf16_dot_products() else "")
    return f"biformer_cpu_torch{version}_{isa}"


def missing_tools() -> str | None:
    """What the build needs and this machine lacks (a one-line reason), or None."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX or install g++)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build() -> None:
    """Compile (or load from the cache) and register ``torch.ops.biformer_cpu``; raises on failure."""
    if hasattr(torch.ops, "biformer_cpu") and hasattr(torch.ops.biformer_cpu, "routed_attention_forward"):
        return  # loaded by an earlier call of this process
    reason = missing_tools()
    if reason is not None:
        raise RuntimeError(reason)
    from torch.utils.cpp_extension import _get_build_directory, load

    name = extension_name()
    directory = Path(_get_build_directory(name, verbose=False))
    if not any(directory.glob(f"{name}*.so")):
        print(f"biformer: building the fused CPU attention kernels once for torch {torch.__version__} "
              f"({cpu_capability()}) in {directory} (about 30 s)", file=sys.stderr, flush=True)
    load(name=name, sources=[str(SOURCE)], extra_cflags=_compile_flags(), is_python_module=False, verbose=False)
    _register_fakes()


def _register_fakes() -> None:
    """Output shapes of the operators for ``torch.compile`` (its graphs call them like PyTorch's own)."""
    from torch.library import register_fake

    def image_attention_forward(
        qkv: torch.Tensor, topk_index: torch.Tensor, grid_h: int, grid_w: int, heads: int, qk_dim: int, scale: float,
        add_to: torch.Tensor | None, with_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, height, width, channels = qkv.shape
        tokens = (height // grid_h) * (width // grid_w)
        lse_shape = (batch, heads, grid_h * grid_w, tokens) if with_lse else (0,)
        return qkv.new_empty(batch, height, width, channels - 2 * qk_dim), qkv.new_empty(lse_shape, dtype=torch.float32)

    def image_attention_backward(
        qkv: torch.Tensor, topk_index: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, grid_h: int, grid_w: int,
        heads: int, qk_dim: int, scale: float, add_v: torch.Tensor | None,
    ) -> torch.Tensor:
        return torch.empty_like(qkv, memory_format=torch.contiguous_format)

    def region_logits(qkv: torch.Tensor, grid_h: int, grid_w: int, qk_dim: int, scale: float) -> torch.Tensor:
        regions = grid_h * grid_w
        return qkv.new_empty(qkv.shape[0], regions, regions, dtype=torch.float32)

    def depthwise_conv(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add_input: bool, add: torch.Tensor | None
    ) -> torch.Tensor:
        return x.new_empty(x.shape)

    def depthwise_conv_weight_grad(
        x: torch.Tensor, grad: torch.Tensor, kernel: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        channels = x.shape[-1]
        return x.new_empty(channels, 1, kernel, kernel, dtype=torch.float32), x.new_empty(channels, dtype=torch.float32)

    for function in (image_attention_forward, image_attention_backward, region_logits, depthwise_conv,
                     depthwise_conv_weight_grad):
        register_fake(f"biformer_cpu::{function.__name__}", function)


@functools.cache
def _load_once() -> str | None:
    """Build or load the kernels once per process: None when they are ready, else why not (one line)."""
    try:
        _build()
    except Exception as error:  # noqa: BLE001 (any build failure falls back to the PyTorch backends)
        lines = [line for line in str(error).splitlines() if line.strip()]
        return lines[0][:300] if lines else type(error).__name__
    return None


def kernels_available() -> bool:
    """Whether the fused CPU kernels can run in this process: not switched off by ``BIFORMER_CPU_KERNELS=0``, and
    built (or loaded from the cache; the first call may build them). A failed build warns once and returns False,
    or raises ``RuntimeError`` when ``BIFORMER_CPU_KERNELS=1``."""
    setting = kernels_setting()
    if setting == "0":
        return False
    reason = _load_once()
    if reason is None:
        return True
    if setting == "1":
        raise RuntimeError(f"{ENV_VARIABLE}=1: the fused CPU kernels could not be built: {reason}")
    _warn_once(reason)
    return False


# kernels_available() as torch.compile sees it: evaluated once while tracing, its answer a constant of the graph
kernels_ready = torch.compiler.assume_constant_result(kernels_available)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"biformer: the fused CPU attention kernels could not be built ({reason}); BRA runs its PyTorch backends "
        f"(the same results, slower). {ENV_VARIABLE}=0 skips the attempt.",
        RuntimeWarning, stacklevel=3,
    )


def build_kernels() -> str:
    """Build (or load) the kernels now and return the cached library's folder; raises ``RuntimeError`` with the
    compiler's message if the build fails. Use it to build ahead of time (e.g. in a container image)."""
    from torch.utils.cpp_extension import _get_build_directory

    _build()
    _load_once.cache_clear()
    return _get_build_directory(extension_name(), verbose=False)


# --- views ----------------------------------------------------------------------------------------------------
def heads_view(x: torch.Tensor) -> torch.Tensor:
    """Head-major (heads, N, R, L, d) as the kernels' 7-D view (N, R, 1, L, 1, heads, d), no copy (regions and
    tokens keep their numbering; the grid shape does not matter to the kernels)."""
    heads, batch, regions, tokens, head_dim = x.shape
    return x.view(heads, batch, regions, 1, tokens, 1, head_dim).permute(1, 2, 3, 4, 5, 0, 6)


# --- autograd ---------------------------------------------------------------------------------------------------
def _lse_like(query7: torch.Tensor, needed: bool) -> torch.Tensor | None:
    batch, grid_h, grid_w, region_h, region_w, heads, _ = query7.shape
    if not needed:
        return None
    return torch.empty(batch, heads, grid_h * grid_w, region_h * region_w, dtype=torch.float32)


class FusedImageAttention(torch.autograd.Function):
    """Routed attention straight from the BRA projection's output, back in image order, with the local context.

    qkv (N, H, W, 2 * qk_dim + C) -> (N, H, W, C), plus ``add_to`` (N, H, W, C) when given, or plus the LCE conv
    (``local_weight`` (C, 1, k, k), k of 3, 5 or 7, ``local_bias`` (C,) or None) of the value channels computed by
    the fused depth-wise kernel. The gradient of qkv is one tensor: the backward kernel writes its q, k and v
    channels and the LCE's input gradient is added to its value channels in place (no zero-filled copy for the
    value slice, as autograd would make).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, qkv: torch.Tensor, topk_index: torch.Tensor,
        add_to: torch.Tensor | None, local_weight: torch.Tensor | None, local_bias: torch.Tensor | None,
        grid_h: int, grid_w: int, num_heads: int, qk_dim: int, scale: float,
    ) -> torch.Tensor:
        if local_weight is not None:
            add_to = torch.ops.biformer_cpu.depthwise_conv(qkv[..., 2 * qk_dim :], local_weight, local_bias, False,
                                                          None)
        with_lse = any(ctx.needs_input_grad)
        out, lse = torch.ops.biformer_cpu.image_attention_forward(
            qkv, topk_index, grid_h, grid_w, num_heads, qk_dim, scale, add_to, with_lse
        )
        if with_lse:
            ctx.save_for_backward(qkv, topk_index, lse, local_weight)
            ctx.geometry = (grid_h, grid_w, num_heads, qk_dim, scale)
            ctx.has_bias = local_bias is not None
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        qkv, topk_index, lse, local_weight = ctx.saved_tensors
        qk_dim = ctx.geometry[3]
        grad = grad.contiguous()
        grad_value = grad_weight = grad_bias = None
        if local_weight is not None:
            if ctx.needs_input_grad[0]:
                grad_value = torch.ops.biformer_cpu.depthwise_conv(grad, local_weight.flip(-2, -1), None, False, None)
            if ctx.needs_input_grad[3] or (ctx.has_bias and ctx.needs_input_grad[4]):
                grad_weight, grad_bias = torch.ops.biformer_cpu.depthwise_conv_weight_grad(
                    qkv[..., 2 * qk_dim :], grad, local_weight.shape[-1]
                )
                grad_weight = grad_weight.to(local_weight.dtype)
                grad_bias = grad_bias.to(local_weight.dtype) if ctx.has_bias else None
        grad_qkv = torch.ops.biformer_cpu.image_attention_backward(qkv, topk_index, lse, grad, *ctx.geometry,
                                                                   grad_value)
        grad_add_to = grad if ctx.needs_input_grad[2] else None
        return grad_qkv, None, grad_add_to, grad_weight, grad_bias, None, None, None, None, None


def image_attention(
    qkv: torch.Tensor, topk_index: torch.Tensor, add_to: torch.Tensor | None, grid_h: int, grid_w: int,
    num_heads: int, qk_dim: int, scale: float, local_weight: torch.Tensor | None = None,
    local_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed attention from the BRA projection's output: qkv (N, H, W, 2 * qk_dim + C) -> (N, H, W, C), plus
    ``add_to`` or the LCE conv of the value channels (see :class:`FusedImageAttention`), through autograd where a
    backward may run, else straight kernel calls."""
    tensors = (qkv, add_to, local_weight, local_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedImageAttention.apply(qkv, topk_index, add_to, local_weight, local_bias, grid_h, grid_w,
                                         num_heads, qk_dim, scale)
    if local_weight is not None:
        add_to = torch.ops.biformer_cpu.depthwise_conv(qkv[..., 2 * qk_dim :], local_weight, local_bias, False, None)
    out, _ = torch.ops.biformer_cpu.image_attention_forward(
        qkv, topk_index, grid_h, grid_w, num_heads, qk_dim, scale, add_to, False
    )
    return out


def route_image(qkv: torch.Tensor, grid_h: int, grid_w: int, qk_dim: int, topk: int, scale: float) -> torch.Tensor:
    """The BRA routing from the projection's output in one kernel pass (region means of q and k and their
    affinities, float32), then ``torch.topk``: qkv (N, H, W, >= 2 * qk_dim) -> int64 (N, R, topk), by descending
    affinity. Not differentiable (as the reference's routing)."""
    logits = torch.ops.biformer_cpu.region_logits(qkv.detach(), grid_h, grid_w, qk_dim, scale)
    return torch.topk(logits, k=topk, dim=-1).indices


class FusedHeadAttention(torch.autograd.Function):
    """Routed attention on head-major tensors: q, k (heads, N, R, L, d_qk), v (heads, N, R, L, d_v) ->
    (heads, N, R, L, d_v)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        topk_index: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        heads, batch, regions, tokens, _ = query.shape
        out = value.new_empty(heads, batch, regions, tokens, value.shape[-1])
        query7 = heads_view(query)
        lse = _lse_like(query7, any(ctx.needs_input_grad))
        torch.ops.biformer_cpu.routed_attention_forward(
            query7, heads_view(key), heads_view(value), topk_index, scale, None, heads_view(out), lse
        )
        if lse is not None:
            ctx.save_for_backward(query, key, value, topk_index, lse)
            ctx.scale = scale
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        query, key, value, topk_index, lse = ctx.saved_tensors
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value)]
        torch.ops.biformer_cpu.routed_attention_backward(
            heads_view(query), heads_view(key), heads_view(value), topk_index, lse, heads_view(grad.contiguous()),
            ctx.scale, *(heads_view(g) for g in grads),
        )
        return grads[0], grads[1], grads[2], None, None
