"""Cost of BRA as images grow: a fixed number of regions per side (n_win, the authors' setting) against a
fixed region size (``region_sizes``), side by side in one run.

    python benchmarks/dense_region_cost.py                      # biformer_tiny backbone, batch 1, inference
    python benchmarks/dense_region_cost.py --sizes 224 512 --repeats 5

With n_win = 7 a region of stage 1 holds (H/28)^2 tokens, so the keys each query attends grow with the
square of the image side; with ``region_sizes=[8, 4, 2, None]`` (the regions n_win = 7 gives at 224 px)
every query attends topk * 64 keys at any size. Times: both models in one process, calls alternated, best of
``--repeats`` after a warm-up (the machine is shared: alternation and the minimum resist other load). Peak
memory: one fresh process per point, its peak resident set during the forward (VmHWM, reset after a 64 px
warm-up) minus its resident set before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from biformer.comparison.cost import memory_status_mib, reset_peak_memory

FIXED_REGION_SIZES = [8, 4, 2, None]  # tokens per region side in stages 1-3 (stage 4 has plain attention)
TOPKS = [1, 4, 16]


def keys_per_query(size: int, mode: str) -> list[int]:
    """Keys each query attends in stages 1-3 (padding included, as BRA pads to whole regions)."""
    keys = []
    for stage, topk in enumerate(TOPKS):
        tokens = -(-size // 4 // 2**stage)  # stage map side
        side = -(-tokens // 7) if mode == "n_win" else FIXED_REGION_SIZES[stage]
        regions = 49 if mode == "n_win" else (-(-tokens // side)) ** 2
        keys.append(min(topk, regions) * side * side)
    return keys


def build(mode: str, threads: int):
    from biformer.dense import BiFormerBackbone

    torch.set_num_threads(threads)
    region_sizes = FIXED_REGION_SIZES if mode == "region_size" else None
    return BiFormerBackbone("biformer_tiny", n_win=7, region_sizes=region_sizes).eval()


def memory_worker(size: int, mode: str, threads: int) -> dict:
    """In a fresh process: the growth of the peak resident set caused by one forward at ``size``."""
    backbone = build(mode, threads)
    image = torch.rand(1, 3, size, size)
    with torch.no_grad():
        backbone(torch.rand(1, 3, 64, 64))
        reset_peak_memory()
        baseline = memory_status_mib("VmRSS")
        backbone(image)
    return dict(size=size, mode=mode, extra_mib=memory_status_mib("VmHWM") - baseline)


def interleaved_times(size: int, repeats: int, threads: int) -> dict[str, float]:
    """Forward time of both modes, alternated call by call (a warm-up each first), best of ``repeats``."""
    backbones = {mode: build(mode, threads) for mode in ("n_win", "region_size")}
    image = torch.rand(1, 3, size, size)
    times: dict[str, list[float]] = {mode: [] for mode in backbones}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for mode, backbone in backbones.items():
                start = time.perf_counter()
                backbone(image)
                times[mode].append(time.perf_counter() - start)
    return {mode: min(values[1:]) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 768, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-worker", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(int(args.memory_worker[0]), args.memory_worker[1], args.threads)))
        return
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| image | keys/query n_win=7 (stages 1-3) | keys/query region 8,4,2 | time n_win | time region | "
          "ratio | extra memory n_win | extra memory region | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        results = {}
        for mode in ("n_win", "region_size"):  # one fresh process each, for a clean peak
            command = [sys.executable, __file__, "--memory-worker", str(size), mode, "--threads", str(args.threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(output.strip().splitlines()[-1])
        for mode, seconds in interleaved_times(size, args.repeats, args.threads).items():
            results[mode]["seconds"] = seconds
        fixed, sized = results["n_win"], results["region_size"]
        print(f"| {size} px | {keys_per_query(size, 'n_win')} | {keys_per_query(size, 'region_size')} | "
              f"{fixed['seconds'] * 1000:.0f} ms | {sized['seconds'] * 1000:.0f} ms | "
              f"{fixed['seconds'] / sized['seconds']:.2f} | "
              f"{fixed['extra_mib']:.0f} MiB | {sized['extra_mib']:.0f} MiB | "
              f"{fixed['extra_mib'] / max(sized['extra_mib'], 1):.2f} |", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
