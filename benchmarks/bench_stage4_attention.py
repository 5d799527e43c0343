"""The stage-4 global attention (7x7 tokens, 512 channels, 8 heads): SDPA against the explicit form (CPU).

    .venv/bin/python benchmarks/bench_stage4_attention.py       # about 4 minutes on one thread

Prints markdown, ms per call (CPU time of one thread, median of 7 interleaved rounds):

1. the attention alone (the q/k/v projection's time measured on its own and subtracted), batch 8 and 1, fp32
   and bf16 autocast, inference (no gradient) and training (forward + backward):
   ``F.scaled_dot_product_attention`` against ``softmax((q @ k^T) * scale) @ v``;
2. biformer_small's stage 4 (its 4 blocks) forward + backward with either form in
   :func:`biformer.layers.attention_lepe._attention`, the same batches and dtypes.

The library runs the explicit form where a gradient is needed on CPU in bf16, SDPA otherwise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import timm
import torch
import torch.nn.functional as F

import biformer  # noqa: F401  (registers the models)
import biformer.layers.attention_lepe as attention_lepe

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul((torch.matmul(q, k.transpose(-2, -1)) * scale).softmax(dim=-1), v)


def interleaved(calls: dict[str, Callable[[], object]], reps: int, rounds: int = 7) -> dict[str, float]:
    """Median ms per call of each callable, the callables taking turns."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.process_time()
            for _ in range(reps):
                call()
            times[name].append((time.process_time() - start) / reps * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def projected_attention(form: Attention, projection: torch.nn.Linear, x: torch.Tensor, dtype: str,
                        training: bool, heads: int = 8) -> None:
    """q/k/v projection, then ``form``; with ``training`` a backward through both."""
    batch, tokens, channels = x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.set_grad_enabled(training):
        qkv = projection(x).view(batch, tokens, 3, heads, channels // heads)
        out = form(*qkv.permute(2, 0, 3, 1, 4).unbind(0), (channels // heads) ** -0.5)
        if training:
            out.float().sum().backward()


def projection_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return v


def attention_alone() -> None:
    channels, tokens = 512, 49
    print("| batch | dtype | mode | SDPA ms | explicit ms | SDPA / explicit |\n|---|---|---|---|---|---|")
    for batch in (8, 1):
        for dtype in ("fp32", "bf16"):
            for mode in ("inference", "training"):
                torch.manual_seed(0)
                training = mode == "training"
                x = torch.randn(batch, tokens, channels, requires_grad=training)
                projection = torch.nn.Linear(channels, 3 * channels, bias=False)
                args = (projection, x, dtype, training)
                ms = interleaved({name: partial(projected_attention, form, *args) for name, form in
                                  (("sdpa", sdpa), ("explicit", explicit), ("projection", projection_only))},
                                 reps=20 if batch == 8 else 100)
                a, b = ms["sdpa"] - ms["projection"], ms["explicit"] - ms["projection"]
                print(f"| {batch} | {dtype} | {mode} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


def stage_step(form: Attention, stage: torch.nn.Module, x: torch.Tensor, dtype: str) -> None:
    """Stage forward + backward with ``form`` as the library's attention."""
    attention_lepe._attention = form
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = stage(x)
    out.float().sum().backward()


def stage4() -> None:
    model = timm.create_model("biformer_small").to(memory_format=torch.channels_last)
    stage = model.stages[3]
    print("\n| batch | dtype | stage 4 fwd + bwd, SDPA ms | explicit ms | SDPA / explicit |\n|---|---|---|---|---|")
    for batch in (8, 1):
        x = torch.randn(batch, 512, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        for dtype in ("bf16", "fp32"):
            ms = interleaved({"sdpa": partial(stage_step, sdpa, stage, x, dtype),
                              "explicit": partial(stage_step, explicit, stage, x, dtype)},
                             reps=10 if batch == 8 else 40)
            print(f"| {batch} | {dtype} | {ms['sdpa']:.2f} | {ms['explicit']:.2f} | "
                  f"{ms['sdpa'] / ms['explicit']:.2f}x |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    library_form = attention_lepe._attention
    try:
        attention_alone()
        stage4()
    finally:
        attention_lepe._attention = library_form
