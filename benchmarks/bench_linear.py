"""oneDNN's fused GEMM against nn.Linear's in CPU inference (float32, and bfloat16 autocast), whole models, side
by side in one process.

    .venv/bin/python benchmarks/bench_linear.py                  # biformer_small and swin_tiny, batch 1 and 8
    .venv/bin/python benchmarks/bench_linear.py --rounds 5 --models biformer_tiny --dtypes bf16

The rule behind :mod:`biformer.ops.linear`: for each model, dtype and batch, the same forward with the oneDNN path
off and on takes turns (``BIFORMER_ONEDNN_LINEAR`` switched between calls; for timm's own models every plain
``nn.Linear`` is swapped the same way, to show what the GEMM alone is worth); one thread, the process's CPU time,
the median of the rounds. float32 compares oneDNN's GEMM with MKL's ``addmm``; bf16 runs each forward in its own
``torch.autocast`` context, as an application does, so "off" includes autocast's casts of the weights at every
forward and "on" uses the kept bfloat16 weights. Prints markdown: the machine (with the default the CPU rule
gives), then per model, dtype and batch the two times, their ratio and the largest difference of the logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch
import torch.nn as nn

import biformer  # noqa: F401 (registers the models)
from biformer.ops import linear as onednn

try:
    from bench_vs_swin import cpu_name
except ImportError:  # run from elsewhere
    def cpu_name() -> str:
        return "CPU: (unknown)"


def swap_all_linears(enabled: list[bool]) -> None:
    """Make every plain ``nn.Linear`` (timm's models too) take oneDNN's GEMM while ``enabled[0]``."""
    plain_forward = nn.Linear.forward

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if enabled[0] and onednn.takes_onednn_path(x, self):
            return onednn.onednn_linear(x, self)
        return plain_forward(self, x)

    nn.Linear.forward = forward


DTYPES = ("fp32", "bf16")  # bf16: under CPU autocast


def parse_dtypes(text: str) -> list[str]:
    """``--dtypes``: a comma-separated subset of fp32, bf16."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise SystemExit(f"--dtypes: expected a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return names


def run(model: nn.Module, x: torch.Tensor, ours: bool, on: bool, swapped: list[bool], bf16: bool) -> torch.Tensor:
    """One forward (no gradients; in its own bf16 autocast context if ``bf16``) with the oneDNN path ``on`` or
    off: biformer's own switch; for timm's models every ``nn.Linear`` swapped (with the switch on, which the
    swap's checks read)."""
    os.environ[onednn.ENV_VARIABLE] = "1" if on or not ours else "0"
    swapped[0] = on and not ours
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="biformer_small,swin_tiny_patch4_window7_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    args = parser.parse_args()
    dtypes = parse_dtypes(args.dtypes)
    torch.set_num_threads(args.threads)
    default = onednn._machine_prefers_onednn()
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU time; oneDNN linear "
          f"available: {onednn._available()} (native bf16: {onednn._bf16_available()}), on by default on this "
          f"CPU: {default}\n")
    if not onednn._available():
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise): nothing to do")
    swapped = [False]
    swap_all_linears(swapped)
    print("| model | dtype | batch | nn.Linear, ms | oneDNN, ms | ratio | max logit difference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = timm.create_model(name).eval()
        ours = name.startswith("biformer")
        for dtype in dtypes:
            bf16 = dtype == "bf16"
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, 224, 224)
                times: dict[bool, list[float]] = {False: [], True: []}
                fused, plain = (run(model, x, ours, on, swapped, bf16) for on in (True, False))
                difference = (fused.float() - plain.float()).abs().max().item()
                for _ in range(args.rounds):
                    for on in (False, True):
                        start = time.process_time()
                        run(model, x, ours, on, swapped, bf16)
                        times[on].append(time.process_time() - start)
                off, on = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
                print(f"| {name} | {dtype} | {batch} | {off:.1f} | {on:.1f} | {off / on:.3f}x | {difference:.1e} |",
                      flush=True)
    os.environ.pop(onednn.ENV_VARIABLE, None)


if __name__ == "__main__":
    main()
