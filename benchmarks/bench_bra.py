"""BRA speed and memory, every backend side by side with the reference formulation, in one run.

    .venv/bin/python benchmarks/bench_bra.py            # everything (about 8 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_bra.py --quick    # fewer rounds, no torch.compile rows

Prints markdown tables:

1. the machine: fp32 / bf16 matmul GFLOP/s measured now, load average before and after;
2. biformer_tiny, batch 8, 224 px: images/s for fp32 inference, an fp32 training step (forward, backward,
   SGD step) and bf16 autocast inference, per backend (and ``auto`` / ``flex`` under ``torch.compile``).
   Each backend runs in its own fresh process, as a user runs it (the C allocator's state then depends on
   that backend alone); the processes take turns over several rounds and the best round is kept, so every
   ratio compares runs made under the same machine load. Peak extra memory of fp32 inference (a fresh
   process per backend); achieved GFLOP/s against the matmul ceiling;
3. one BRA layer (stage 1 of biformer_tiny: 64 channels, 2 heads, 7 x 7 regions, top-1) against full
   global attention on the stage-1 map of growing images (224 to 1024 px), with attention FLOPs;
4. peak extra memory of biformer_tiny inference (batch 1, auto_pad) at 512, 1024 and 2048 px, one fresh
   process per configuration. The reference formulation is not run at 2048 px: it needs about 22.8 GB
   (see ``../shared/PERF_NOTES.md``) and would take this 24 GiB machine down.

"Peak extra memory" is the process's peak resident memory (VmHWM, reset just before the forward) minus
its resident memory before the forward: the activations and temporaries of that one forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

THREADS = 2
BACKENDS = ["reference", "gather", "sdpa", "dense", "flex", "auto"]
MEMORY_SIZES = [512, 1024, 2048]
REFERENCE_MAX_SIZE = 1024  # never run the reference formulation above this here (memory)
LAYER_SIZES = [224, 448, 640, 832, 1024]


# --- measuring ----------------------------------------------------------------------------------------
def best_time(function: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each function over ``rounds``, the functions taking turns (same load for all)."""
    for function in functions.values():
        function()  # warm-up
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(rounds):
        for name, function in functions.items():
            best[name] = min(best[name], best_time(function, 1))
    return best


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    return 2 * size**3 / best_time(lambda: a @ b, repeats) / 1e9


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# --- models -------------------------------------------------------------------------------------------
def make_model(backend: str | None, **kwargs: object) -> torch.nn.Module:
    """biformer_tiny with every BRA on ``backend`` (None: follow ``biformer.attention_backend``)."""
    import timm

    import biformer  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    return timm.create_model("biformer_tiny", backend=backend, **kwargs)


def model_flops_per_image(size: int = 224) -> float:
    """FLOPs of one biformer_tiny image (matmuls and convs, counted on the reference formulation)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model("reference").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


# --- workers: each measurement in a fresh process ----------------------------------------------------------
# One backend per process, as a user runs it: the C allocator's state (which large buffers come back as
# fresh pages) then depends on that backend alone, not on what another backend allocated before it.
def memory_worker(backend: str, size: int, batch: int) -> dict[str, float]:
    torch.set_num_threads(THREADS)
    model = make_model(backend).eval()
    images = torch.randn(batch, 3, size, size)
    before_kib = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    start = time.perf_counter()
    with torch.no_grad():
        model(images)
    seconds = time.perf_counter() - start
    peak_kib = proc_status_kib("VmHWM")
    return {"extra_mib": (peak_kib - before_kib) / 1024, "seconds": seconds}


def throughput_worker(backend: str, compiled: bool, repeats: int) -> dict[str, float]:
    """Best seconds per batch of biformer_tiny (batch 8, 224 px): fp32 and bf16 inference, fp32 training
    step (forward, backward, SGD step); with ``compiled``, fp32 inference under ``torch.compile`` only."""
    torch.set_num_threads(THREADS)
    images, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    model = make_model(backend)
    if compiled:
        runner = torch.compile(model.eval(), dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            runner(images)
        compile_seconds = time.perf_counter() - start
        with torch.no_grad():
            return {"infer": best_time(lambda: runner(images), repeats), "compile_s": compile_seconds}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def training_step() -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = {}
    with torch.no_grad():
        model.eval()
        model(images)
        result["infer"] = best_time(lambda: model(images), repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
            result["bf16"] = best_time(lambda: model(images), repeats)
    model.train()
    training_step()
    result["train"] = best_time(training_step, max(1, repeats - 1))
    return result


def run_worker(kind: str, *arguments: object) -> dict[str, float] | None:
    """Run a ``--worker`` measurement in a fresh interpreter; None if it failed (the error is printed)."""
    command = [sys.executable, __file__, "--worker", json.dumps([kind, *arguments])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"<!-- {kind} worker {arguments} failed: {result.stderr[-500:]} -->")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory(backend: str, size: int, batch: int) -> dict[str, float] | None:
    return run_worker("memory", backend, size, batch)


WORKERS = {"memory": memory_worker, "throughput": throughput_worker}


# --- sections -------------------------------------------------------------------------------------------
def section_machine() -> dict[str, float]:
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print("## Machine\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average (1/5/15 min) {load_average()}\n")
    print("| matmul 2048^3 | GFLOP/s |\n|---|---|")
    print(f"| fp32 | {fp32:.0f} |\n| bf16 | {bf16:.0f} |\n")
    return {"fp32": fp32, "bf16": bf16}


def section_model(rounds: int, repeats: int, compile_rows: bool, machine: dict[str, float]) -> None:
    batch, size = 8, 224
    configs = [(b, False) for b in BACKENDS] + ([("auto", True), ("flex", True)] if compile_rows else [])
    best: dict[tuple[str, bool], dict[str, float]] = {}
    for _ in range(rounds):  # rounds of fresh processes, the backends taking turns: same load for all
        for config in configs:
            measured = run_worker("throughput", *config, repeats) or {}
            kept = best.setdefault(config, {})
            for key, value in measured.items():
                kept[key] = min(kept.get(key, float("inf")), value)
    rows: dict[str, dict[str, float]] = {}
    for (backend, compiled), seconds in best.items():
        name = f"{backend} + torch.compile" if compiled else backend
        rows[name] = {key: (value if key == "compile_s" else batch / value) for key, value in seconds.items()}
    for b in BACKENDS:
        memory = measure_memory(b, size, batch)
        rows[b]["memory"] = memory["extra_mib"] if memory else float("nan")
    flops = model_flops_per_image(size)
    print(f"## biformer_tiny, batch {batch}, {size} px (images/s, higher is better; x = ratio to reference)\n")
    print(f"Model FLOPs per image (FlopCounterMode, reference formulation): {flops / 1e9:.2f} GFLOP. "
          f"Best of {rounds} rounds of fresh processes (one per backend, taking turns), {repeats} timed "
          "calls each.\n")
    print("| backend | fp32 inference | fp32 training step | bf16 autocast inference | fp32 inference GFLOP/s "
          "(% of fp32 matmul) | peak extra memory, fp32 inference |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [ratio_cell(row, rows["reference"], key, unit) for key, unit in
                 (("infer", ""), ("train", ""), ("bf16", ""))]
        achieved = row["infer"] * flops / 1e9
        cells.append(f"{achieved:.0f} ({100 * achieved / machine['fp32']:.0f}%)")
        cells.append(ratio_cell(row, rows["reference"], "memory", " MiB"))
        note = f" (compile {row['compile_s']:.0f} s)" if "compile_s" in row else ""
        print(f"| {name}{note} | " + " | ".join(cells) + " |")
    print(f"\nload average after: {load_average()}\n")


def ratio_cell(row: dict[str, float], reference: dict[str, float], key: str, unit: str) -> str:
    """'value (ratio to reference x)' or '-' when the row has no such value."""
    if key not in row:
        return "-"
    return f"{row[key]:,.1f}{unit} ({row[key] / reference[key]:.2f}x)"


def attention_flops(tokens: int, keys_per_query: int, channels: int) -> float:
    """q @ k^T and weights @ v for ``tokens`` queries of ``keys_per_query`` keys each."""
    return 2 * 2 * tokens * keys_per_query * channels


def section_layer_growth(repeats: int) -> None:
    from biformer import AttentionLePE, BiLevelRoutingAttention

    dim, heads = 64, 2
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, topk=1, side_dwconv=5, auto_pad=True).eval()
    fixed = BiLevelRoutingAttention(dim, num_heads=heads, topk=1, side_dwconv=5, region_size=8).eval()
    full = AttentionLePE(dim, num_heads=heads, side_dwconv=5, qkv_bias=True).eval()
    print("## One attention layer on the stage-1 map (64 channels, 2 heads), batch 1, fp32 inference\n")
    print("BRA as in biformer_tiny stage 1 (7 x 7 regions, top-1; reference formulation and auto), BRA with "
          "fixed 8 x 8 regions (top-1, `region_size=8`), and full global attention (`AttentionLePE`, SDPA). "
          "Milliseconds (best of the rounds) and attention GFLOP (q k^T and weights v only).\n")
    print("| image px | map | BRA reference ms | BRA auto ms (x faster) | BRA GFLOP | fixed-region BRA ms | "
          "fixed-region GFLOP | full attention ms | full GFLOP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for image_size in LAYER_SIZES:
        side = image_size // 4
        x = torch.randn(1, side, side, dim)
        padded = -(-side // 7) * 7
        region_tokens = (padded // 7) ** 2
        timings = interleaved_best(
            {
                "reference": layer_call(bra, x, "reference"),
                "auto": layer_call(bra, x, "auto"),
                "fixed": layer_call(fixed, x, "auto"),
                "full": layer_call(full, x, "auto"),
            },
            repeats,
        )
        tokens = side * side
        bra_flops = attention_flops(padded * padded, region_tokens, dim)
        fixed_flops = attention_flops(tokens, 64, dim)
        full_flops = attention_flops(tokens, tokens, dim)
        ms = {k: v * 1e3 for k, v in timings.items()}
        print(f"| {image_size} | {side}x{side} | {ms['reference']:.1f} | {ms['auto']:.1f} "
              f"({ms['reference'] / ms['auto']:.1f}x) | {bra_flops / 1e9:.2f} | {ms['fixed']:.1f} | "
              f"{fixed_flops / 1e9:.2f} | {ms['full']:.1f} | {full_flops / 1e9:.2f} |")
    print()


def layer_call(layer: torch.nn.Module, x: torch.Tensor, backend: str) -> Callable[[], object]:
    from biformer import attention_backend

    def run() -> None:
        with torch.no_grad(), attention_backend(backend):
            layer(x)

    return run


def section_memory() -> None:
    print("## biformer_tiny inference, batch 1, auto_pad: peak extra memory (fresh process per cell)\n")
    print("| image px | reference | auto | auto / reference | reference time s | auto time s |")
    print("|---|---|---|---|---|---|")
    for size in MEMORY_SIZES:
        reference = measure_memory("reference", size, 1) if size <= REFERENCE_MAX_SIZE else None
        auto = measure_memory("auto", size, 1)

        def mib(cell: dict[str, float] | None) -> str:
            return f"{cell['extra_mib']:,.0f} MiB" if cell else "not run (~22,846 MiB, PERF_NOTES)"

        def seconds(cell: dict[str, float] | None) -> str:
            return f"{cell['seconds']:.1f}" if cell else "-"

        ratio = f"{auto['extra_mib'] / reference['extra_mib']:.2f}x" if reference and auto else "-"
        print(f"| {size} | {mib(reference)} | {mib(auto)} | {ratio} | {seconds(reference)} | {seconds(auto)} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and no torch.compile rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *arguments = json.loads(args.worker)
        print(json.dumps(WORKERS[kind](*arguments)))
        return
    torch.set_num_threads(THREADS)
    rounds, repeats = (1, 2) if args.quick else (3, 4)
    command = " ".join(["benchmarks/bench_bra.py", *sys.argv[1:]])
    print(f"# BRA benchmark (`{command}`)\n")
    machine = section_machine()
    section_model(rounds, repeats, compile_rows=not args.quick, machine=machine)
    section_layer_growth(2 if args.quick else 3)
    section_memory()
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
