"""What each attention type costs: FLOPs, parameters, images/s and peak memory, per image size.

- **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the forward pass whose memory is
  measured (below). It counts matrix products and convolutions: ``mm``, ``addmm``, ``bmm``, ``baddbmm``
  (``einsum`` and ``matmul`` decompose into them), ``convolution`` and the ``scaled_dot_product_attention``
  kernels, at 2 FLOPs per multiply-add. torch's table has no entry for the CPU kernel of
  ``scaled_dot_product_attention`` (``_scaled_dot_product_flash_attention_for_cpu``), so attention on CPU
  would count as zero: :data:`CPU_ATTENTION_FLOPS` adds it with torch's own formula (masked-out scores are
  counted, as the kernel computes them). Not counted: element-wise work, softmax, normalisation, ``gather``
  / ``index_select`` (BRA's key/value gather) and ``grid_sample`` (deformable attention's sampling): they
  move memory more than they compute, and show up in images/s.
- **Peak memory**: one fresh process per (type, size) builds the model, runs a 64 px warm-up forward,
  resets the kernel's peak resident-set counter (``/proc/self/clear_refs``, Linux) and reports the peak
  resident set during one forward at the size (``VmHWM``) minus the resident set before it: the extra
  memory of inference, weights excluded (the FLOP counter holds no tensors). The process runs under an
  address-space limit (``RLIMIT_AS``), so a configuration that would need more than ``memory_limit_gib``
  fails inside its own process instead of taking the machine down; it is then reported as skipped with
  the reason.
- **Images/s**: every type's model lives in one process; after one warm-up call each, the types take
  turns call by call for ``repeats`` rounds (the same machine load for all), and the median time per call
  is reported. Inference (``torch.no_grad``), fp32, batch ``batch_size``. A configuration whose forward in
  the memory process took longer than ``max_forward_s`` is not timed (its FLOPs and memory are kept).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["CostPoint", "build_model", "count_flops", "measure_cost", "measure_peak_memory", "time_interleaved"]

WARM_UP_SIZE = 64  # px: the forward that fills the allocator's caches before the peak is reset


def _cpu_attention_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *args: Any,
    out_shape: Any = None, **kwargs: Any,
) -> int:
    """FLOPs of the CPU attention kernel: query (N, heads, L, d) @ key^T, then scores @ value (torch's formula)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass
class CostPoint:
    """The cost of one attention type at one image size (None where not measured; ``skipped`` says why)."""

    attn_type: str
    size: int
    batch_size: int
    params: int
    gflops: float | None = None  # per image
    flops_by_op: dict[str, float] = field(default_factory=dict)  # GFLOPs per image, per aten op
    images_per_s: float | None = None  # median over the interleaved repeats
    seconds_per_call: list[float] = field(default_factory=list)  # every timed call, in order
    peak_extra_mib: float | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(model_name: str, attn_type: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, attn_type=attn_type, **kwargs)`` with seeded initialisation, in eval
    mode."""
    import timm

    import biformer  # noqa: F401  (registers the models with timm)

    torch.manual_seed(0)
    return timm.create_model(model_name, attn_type=attn_type, **kwargs).eval()


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, images: torch.Tensor) -> tuple[float, dict[str, float]]:
    """FLOPs of ``model(images)`` for images (N, 3, H, W), without gradients: (total, per aten op)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        model(images)
    by_op = {str(op): float(count) for op, count in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), by_op


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each zero-argument callable in ``calls``, taking turns for ``repeats`` rounds (warm them up
    before)."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return seconds


# --- peak memory: one fresh process per configuration ------------------------------------------------------
def memory_status_mib(field_name: str) -> float:
    """``VmRSS`` (current), ``VmHWM`` (peak) or ``VmSize`` of this process in MiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def reset_peak_memory() -> None:
    """Restart the peak resident set (VmHWM) from the current one (writing 5 to clear_refs, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak extra resident memory (MiB), seconds and FLOPs of one forward at ``spec["size"]``.

    ``spec``: model, attn_type, model_kwargs, size, batch_size, threads, memory_limit_gib.
    """
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], spec["attn_type"], **spec["model_kwargs"])
    images = torch.rand(spec["batch_size"], 3, spec["size"], spec["size"])  # (N, 3, H, W)
    with torch.no_grad():
        model(torch.rand(1, 3, WARM_UP_SIZE, WARM_UP_SIZE))
        limit = int((memory_status_mib("VmSize") + spec["memory_limit_gib"] * 1024) * 2**20)  # bytes of address space
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        reset_peak_memory()
        before = memory_status_mib("VmRSS")
        start = time.perf_counter()
        try:
            flops, flops_by_op = count_flops(model, images)
        except (RuntimeError, MemoryError) as error:
            if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            return dict(skipped=f"needs more than {spec['memory_limit_gib']:g} GiB of extra memory")
        seconds = time.perf_counter() - start
    return dict(peak_extra_mib=memory_status_mib("VmHWM") - before, forward_s=seconds, flops=flops,
                flops_by_op=flops_by_op)


def measure_peak_memory(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`memory_worker` on ``spec`` in a fresh interpreter; ``{"skipped": reason}`` if it fails."""
    command = [sys.executable, "-m", __name__, json.dumps(spec)]
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(skipped=f"one forward took more than {timeout_s:g} s (memory process stopped)")
    if process.returncode != 0:
        last_line = (process.stderr.strip().splitlines() or ["no message"])[-1]
        return dict(skipped=f"memory process failed (exit {process.returncode}): {last_line}")
    return json.loads(process.stdout.strip().splitlines()[-1])


# --- the whole measurement --------------------------------------------------------------------------------
def measure_cost(
    attn_types: Sequence[str],
    sizes: Sequence[int],
    model_name: str = "biformer_tiny",
    model_kwargs: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 1,
    repeats: int = 3,
    threads: int = 1,
    memory_limit_gib: float = 8.0,
    max_forward_s: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[CostPoint]:
    """Cost of every type in ``attn_types`` at every size in ``sizes`` (see the module docstring).

    Args:
        model_kwargs: extra model arguments per attention type (``{type: {...}}``).
        max_forward_s: a configuration whose forward (in the memory process) takes longer is not timed.
    """
    model_kwargs = model_kwargs or {}
    torch.set_num_threads(threads)
    params = {name: parameter_count(build_model(model_name, name, **model_kwargs.get(name, {})))
              for name in attn_types}
    points: list[CostPoint] = []
    for size in sizes:
        row = {name: CostPoint(name, size, batch_size, params[name]) for name in attn_types}
        for name, point in row.items():
            spec = dict(model=model_name, attn_type=name, model_kwargs=model_kwargs.get(name, {}), size=size,
                        batch_size=batch_size, threads=threads, memory_limit_gib=memory_limit_gib)
            memory = measure_peak_memory(spec, timeout_s=max(4 * max_forward_s, 120))
            point.skipped = memory.get("skipped")
            if point.skipped is None:
                point.peak_extra_mib = memory["peak_extra_mib"]
                point.gflops = memory["flops"] / batch_size / 1e9
                point.flops_by_op = {op: count / batch_size / 1e9 for op, count in memory["flops_by_op"].items()}
                if memory["forward_s"] > max_forward_s:
                    point.skipped = f"not timed: one forward took {memory['forward_s']:.3g} s (> {max_forward_s:g} s)"
            log(f"  {size} px {name}: " + (f"{point.gflops:.2f} GFLOPs/image, peak extra memory "
                                            f"{point.peak_extra_mib:.0f} MiB" if point.gflops is not None else "")
                + (f" skipped ({point.skipped})" if point.skipped else ""))
        _time_size(row, model_name, model_kwargs, size, batch_size, repeats)
        for point in row.values():
            if point.images_per_s is not None:
                log(f"  {size} px {point.attn_type}: {point.images_per_s:.2f} images/s")
        points.extend(row.values())
    return points


def _time_size(
    row: dict[str, CostPoint], model_name: str, model_kwargs: dict[str, dict[str, Any]], size: int, batch_size: int,
    repeats: int,
) -> None:
    """Interleaved median images/s of the unskipped points of ``row`` (one warm-up call each first)."""
    images = torch.rand(batch_size, 3, size, size)  # (N, 3, H, W)
    models = {name: build_model(model_name, name, **model_kwargs.get(name, {}))
              for name, point in row.items() if point.skipped is None}
    calls = {name: (lambda model=model: model(images)) for name, model in models.items()}
    with torch.no_grad():
        for call in calls.values():
            call()
        seconds = time_interleaved(calls, repeats)
    for name, values in seconds.items():
        row[name].seconds_per_call = values
        row[name].images_per_s = batch_size / statistics.median(values)


if __name__ == "__main__":
    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
