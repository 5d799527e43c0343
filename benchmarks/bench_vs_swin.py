"""BiFormer against timm models of the same FLOPs, side by side in one run (CPU).

    .venv/bin/python benchmarks/bench_vs_swin.py                 # every row (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_vs_swin.py --quick         # 2 rounds, biformer_small pair only
    .venv/bin/python benchmarks/bench_vs_swin.py --compile       # add the torch.compile rows (both models)
    .venv/bin/python benchmarks/bench_vs_swin.py --profile       # add the torch.profiler top ops
    .venv/bin/python benchmarks/bench_vs_swin.py --threads 1 --clock cpu   # robust ratios on a busy machine
    .venv/bin/python benchmarks/bench_vs_swin.py --rows infer8,train8 --no-layers   # only the rows a change touches

Prints markdown:

1. the machine (torch, threads, fp32 / bf16 matmul GFLOP/s now, load average before and after);
2. the models: GMACs per 224 px image (``torch.utils.flop_counter.FlopCounterMode``) and parameters;
   pairs: biformer_small against timm's ``swin_tiny_patch4_window7_224`` (4.5 GMACs) and biformer_tiny against
   timm's ``pvt_v2_b1`` (2.0 GMACs, the timm pyramid transformer closest to its 2.2 GMACs);
3. the backend ``auto`` chose for each BRA stage (inference and training, fp32 and bf16), read from
   :func:`biformer.chosen_backends`;
4. per pair: inference at batch 1 and 8 in fp32 and under bf16 autocast, a training step (forward, loss,
   backward) at batch 8 in fp32 and bf16 autocast, and with ``--compile`` fp32 inference of both models
   under ``torch.compile``. Eager mode is the main figure. The two models of a pair take turns (interleaved
   rounds: both see the same machine load); each cell is the median of the rounds; ratio = BiFormer's
   images/s over the other model's (above 1: BiFormer is faster);
5. one BRA layer per stage shape of biformer_small at 224 px (batch 8): each backend, inference and
   training, fp32 and bf16 autocast, with the one ``auto`` picks marked: the measurements behind every rule of
   :func:`biformer.ops.select_backend`; and the depth-wise conv's forward + backward per stage shape, the plain
   conv against :class:`biformer.ops.depthwise.DepthwiseConv2dFunction`, fp32 and bf16 autocast (the rows behind
   its kernel-size rule); and the downsampling convs, ``nn.Conv2d`` against
   :class:`biformer.layers.downsample_conv.DownsampleConv2d` with the path it took (the rows behind its
   weight-size rule);
6. with ``--profile``: the top operators of both models of the first pair (inference, batch 8, fp32; and a
   training step), self time and call counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

PAIRS = [("biformer_small", "swin_tiny_patch4_window7_224"), ("biformer_tiny", "pvt_v2_b1")]
SIZE = 224
BACKENDS = ["gather", "sdpa", "dense", "cpu_fused"]


# --- measuring ----------------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def cpu_name() -> str:
    """The CPU's model name, whether it has AMX (bf16 matrix units) and avx512_bf16, and "no avx512" where it has
    neither wide vectors nor bf16 instructions, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        return "CPU: unknown"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    avx = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    widest = "" if "avx512f" in flags else ", no avx512: AVX2 at most" if "avx2" in flags else ", no AVX2"
    return f"CPU: {name} ({amx}, {avx}{widest})"


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# The clock of every timing: wall time (``--clock wall``, the default) or the CPU time of the process
# (``--clock cpu``: with one thread, time other jobs take from the core is not counted).
CLOCK: Callable[[], float] = time.perf_counter


def interleaved_median(functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function over ``rounds``, the functions taking turns in every round."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = CLOCK()
            function()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def create(name: str) -> torch.nn.Module:
    import timm

    import biformer  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    return timm.create_model(name)


def gmacs(model: torch.nn.Module) -> float:
    """Multiply-adds of one 224 px image; BRA counted in its ``gather`` form (the routed formulation's FLOPs, not
    those of ``dense``, which computes every score and masks the unrouted ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    from biformer import attention_backend

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, attention_backend("gather"):
        model.eval()(torch.randn(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 2e9


# --- the rows ------------------------------------------------------------------------------------------
def inference_call(model: torch.nn.Module, batch: int, bf16: bool) -> Callable[[], object]:
    images = torch.randn(batch, 3, SIZE, SIZE)

    def call() -> object:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(images)

    return call


def training_call(model: torch.nn.Module, batch: int, bf16: bool) -> Callable[[], object]:
    images, labels = torch.randn(batch, 3, SIZE, SIZE), torch.randint(0, 1000, (batch,))

    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        model.zero_grad(set_to_none=True)
        loss.backward()

    return call


ROWS = {
    # key for --rows: (label, kind, batch, bf16)
    "infer1": ("inference, batch 1, fp32", "infer", 1, False),
    "infer8": ("inference, batch 8, fp32", "infer", 8, False),
    "infer1-bf16": ("inference, batch 1, bf16 autocast", "infer", 1, True),
    "infer8-bf16": ("inference, batch 8, bf16 autocast", "infer", 8, True),
    "train8": ("training step (forward + backward), batch 8, fp32", "train", 8, False),
    "train8-bf16": ("training step (forward + backward), batch 8, bf16 autocast", "train", 8, True),
}


def parse_rows(text: str | None) -> list[str]:
    """``--rows``: comma-separated keys of ``ROWS`` (None: all of them), in the table's order."""
    if text is None:
        return list(ROWS)
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in ROWS]
    if unknown or not keys:
        raise SystemExit(f"--rows: expected a comma-separated list of {', '.join(ROWS)}, got {text!r}")
    return [key for key in ROWS if key in keys]


def section_pair(ours: str, theirs: str, rounds: int, compile_rows: bool, rows: list[str]) -> None:
    models = {ours: create(ours), theirs: create(theirs)}
    print(f"### {ours} against {theirs}\n")
    print(f"Images/s, median of {rounds} interleaved rounds; ratio = {ours} / {theirs}.\n")
    print(f"| | {ours} | {theirs} | ratio |\n|---|---|---|---|")
    for label, kind, batch, bf16 in (ROWS[key] for key in rows):
        calls = {}
        for name, model in models.items():
            model.train(kind == "train")
            make = training_call if kind == "train" else inference_call
            calls[name] = make(model, batch, bf16)
        seconds = interleaved_median(calls, rounds)
        rate = {name: batch / value for name, value in seconds.items()}
        print(f"| {label} | {rate[ours]:.2f} | {rate[theirs]:.2f} | {rate[ours] / rate[theirs]:.2f}x |", flush=True)
    if compile_rows:
        batch = 8
        calls, compile_seconds = {}, {}
        for name, model in models.items():
            compiled = torch.compile(model.eval(), dynamic=False)
            calls[name] = inference_call(compiled, batch, False)
            start = time.perf_counter()
            calls[name]()
            compile_seconds[name] = time.perf_counter() - start
        seconds = interleaved_median(calls, rounds)
        rate = {name: batch / value for name, value in seconds.items()}
        print(f"| torch.compile inference, batch {batch}, fp32 (compile {compile_seconds[ours]:.0f} s / "
              f"{compile_seconds[theirs]:.0f} s) | {rate[ours]:.2f} | {rate[theirs]:.2f} | "
              f"{rate[ours] / rate[theirs]:.2f}x |")
    print()


def section_models(names: list[str]) -> None:
    print("## Models (224 px)\n\n| model | GMACs | parameters |\n|---|---|---|")
    for name in names:
        model = create(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {gmacs(model):.2f} | {params:.2f} M |")
    print()


def section_auto(names: list[str]) -> None:
    import biformer

    print("## The backend `auto` chose per BRA stage (224 px, `biformer.chosen_backends`)\n")
    if not hasattr(biformer, "chosen_backends"):
        print("(this version of biformer has no `chosen_backends`)\n")
        return
    print("| model | inference fp32 | inference bf16 | training fp32 | training bf16 |\n|---|---|---|---|---|")
    images = torch.randn(1, 3, SIZE, SIZE)
    for name in names:
        model = create(name)
        cells = []
        for training in (False, True):
            for bf16 in (False, True):
                with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    chosen = biformer.chosen_backends(model.train(training), images)
                per_stage: dict[str, list[str]] = {}
                for module, backend in chosen.items():  # "stages.0.0.attn" -> stage 1
                    stage = f"stage {int(module.split('.')[1]) + 1}"
                    if backend not in per_stage.setdefault(stage, []):
                        per_stage[stage].append(backend)
                cells.append(", ".join(f"{stage}: {'/'.join(b)}" for stage, b in per_stage.items()))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def section_layers(rounds: int) -> None:
    """One BRA layer per stage shape of biformer_small at 224 px, every backend: the rows behind ``auto``."""
    from biformer import BiLevelRoutingAttention

    batch = 8
    print(f"## One BRA layer per stage shape (biformer_small at 224 px, batch {batch}), ms per call\n")
    print("Median of interleaved rounds; `*` marks the backend `auto` picks for that shape, mode and dtype.\n")
    print("| stage (map, channels, heads, regions x tokens, topk) | mode | " + " | ".join(BACKENDS) + " |")
    print("|---|---|" + "---|" * len(BACKENDS))
    stages = [(56, 64, 2, 1), (28, 128, 4, 4), (14, 256, 8, 16)]
    for index, (side, dim, heads, topk) in enumerate(stages, start=1):
        torch.manual_seed(0)
        layer = BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, topk=topk, side_dwconv=5)
        x = torch.randn(batch, side, side, dim)
        for mode, dtype in (("inference fp32", torch.float32), ("inference bf16", torch.bfloat16),
                            ("training fp32", torch.float32), ("training bf16", torch.bfloat16)):
            training = mode.startswith("training")
            calls = {}
            for backend in BACKENDS:
                calls[backend] = layer_call(layer, x, backend, training, dtype)
            seconds = interleaved_median(calls, rounds)
            chosen = chosen_backend(layer, x, training, dtype)
            cells = [f"{seconds[b] * 1e3:.1f}{' *' if b == chosen else ''}" for b in BACKENDS]
            shape = f"{index} ({side}x{side}, {dim}, {heads}, 49 x {(side // 7) ** 2}, {topk})"
            print(f"| {shape} | {mode} | " + " | ".join(cells) + " |", flush=True)
    print()


def chosen_backend(layer: torch.nn.Module, x: torch.Tensor, training: bool, dtype: torch.dtype) -> str | None:
    """What ``auto`` runs for this layer call (None where this biformer version cannot say)."""
    if not hasattr(layer, "backend_for"):
        return None
    layer.backend = None
    x = x.clone().requires_grad_(training)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        return layer.backend_for(x)


def section_depthwise(rounds: int) -> None:
    """Depth-wise conv forward + backward per stage shape: the plain conv against biformer's two training forms
    (``DepthwiseConv2dFunction``, and the fused CPU kernel ``FusedDepthwiseConv`` where it is built)."""
    import torch.nn.functional as F

    try:
        from biformer.ops.depthwise import DepthwiseConv2dFunction
    except ImportError:
        print("## Depth-wise convs: (this version of biformer has no biformer.ops.depthwise)\n")
        return
    try:
        from biformer.ops.cpu_kernels import kernels_available
        from biformer.ops.depthwise import FusedDepthwiseConv

        fused_available = kernels_available()
    except ImportError:  # a version without the fused kernels
        fused_available = False
    batch = 8
    print(f"## Depth-wise conv, forward + backward, channels-last, batch {batch}, ms per call\n")
    print("In training, float32 kernels of 5 and 7 take the fused kernel where it is built, other kernels of at "
          "least `FAST_BACKWARD_MIN_KERNEL` (5) `DepthwiseConv2dFunction`; the rest keep `F.conv2d`. `*` marks the "
          "form training takes.\n")
    print("| map, channels | kernel | dtype | `F.conv2d` (oneDNN backward) | `DepthwiseConv2dFunction` | "
          "fused kernel |")
    print("|---|---|---|---|---|---|")
    for side, dim in ((56, 64), (28, 128), (14, 256), (7, 512)):
        for kernel, bf16 in ((3, False), (5, False), (3, True), (5, True)):
            x = torch.randn(batch, dim, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
            weight = torch.randn(dim, 1, kernel, kernel, requires_grad=True)
            bias = torch.randn(dim, requires_grad=True)
            grad = torch.randn(batch, dim, side, side).contiguous(memory_format=torch.channels_last)

            def plain(x=x, weight=weight, bias=bias, grad=grad, bf16=bf16) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
                out.backward(grad.to(out.dtype))

            def ours(x=x, weight=weight, bias=bias, grad=grad, bf16=bf16) -> None:
                dtype = torch.bfloat16 if bf16 else torch.float32  # the casts autocast makes, then the conv
                out = DepthwiseConv2dFunction.apply(x.to(dtype), weight.to(dtype), bias.to(dtype))
                out.backward(grad.to(out.dtype))

            def fused(x=x, weight=weight, bias=bias, grad=grad, bf16=bf16) -> None:
                dtype = torch.bfloat16 if bf16 else torch.float32  # the map in the dtype autocast gives it
                out = FusedDepthwiseConv.apply(x.to(dtype).permute(0, 2, 3, 1), weight, bias, False)
                out.backward(grad.to(out.dtype).permute(0, 2, 3, 1))

            calls = {"plain": plain, "ours": ours} | ({"fused": fused} if fused_available else {})
            seconds = interleaved_median(calls, rounds)
            taken = "fused" if fused_available and kernel >= 5 and not bf16 else "ours" if kernel >= 5 else "plain"
            cells = [f"{seconds[name] * 1e3:.2f}{' *' if name == taken else ''}" if name in seconds else "-"
                     for name in ("plain", "ours", "fused")]
            dtype = "bf16 autocast" if bf16 else "fp32"
            print(f"| {side}x{side}, {dim} | {kernel}x{kernel} | {dtype} | " + " | ".join(cells) + " |", flush=True)
    print()


def section_downsample(rounds: int) -> None:
    """The downsampling convs (3x3, stride 2, channels-last): ``nn.Conv2d`` against ``DownsampleConv2d``."""
    try:
        from biformer.layers.downsample_conv import DownsampleConv2d
    except ImportError:
        print("## Downsampling convs: (this version of biformer has no biformer.layers.downsample_conv)\n")
        return
    import torch.nn as nn

    print("## Downsampling convs (3x3, stride 2, channels-last input), ms per call\n")
    print("`DownsampleConv2d`'s path: `kept` (a channels-last copy of the weight, without gradients), `nchw` (the "
          "conv on NCHW input, fp32 training) or `plain` (the `nn.Conv2d` forward: small weights, bf16 training).\n")
    print("| conv, map | batch | mode | `nn.Conv2d` | `DownsampleConv2d` | path | ratio |")
    print("|---|---|---|---|---|---|---|")
    for cin, cout, side in ((64, 128, 56), (128, 256, 28), (256, 512, 14)):
        ours = DownsampleConv2d(cin, cout, kernel_size=3, stride=2, padding=1)
        plain_conv = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1)
        plain_conv.load_state_dict(ours.state_dict())
        for batch in (1, 8):
            for mode in ("inference fp32", "inference bf16", "training fp32", "training bf16"):
                training, bf16 = mode.startswith("training"), mode.endswith("bf16")
                x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
                x.requires_grad_(training)

                def call(conv: nn.Module, x=x, training=training, bf16=bf16) -> None:
                    with torch.set_grad_enabled(training), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        out = conv(x)
                    if training:
                        out.float().sum().backward()

                with torch.set_grad_enabled(training), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    path = ours.path(x)
                seconds = interleaved_median({"plain": partial(call, plain_conv), "ours": partial(call, ours)}, rounds)
                print(f"| {cin} -> {cout}, {side}x{side} | {batch} | {mode} | {seconds['plain'] * 1e3:.2f} | "
                      f"{seconds['ours'] * 1e3:.2f} | {path} | {seconds['plain'] / seconds['ours']:.2f}x |",
                      flush=True)
    print()


def layer_call(
    layer: torch.nn.Module, x: torch.Tensor, backend: str, training: bool, dtype: torch.dtype
) -> Callable[[], object]:
    from biformer import attention_backend

    bf16 = dtype == torch.bfloat16
    x = x.clone().requires_grad_(training)

    def call() -> None:
        with attention_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if training:
                layer(x).sum().backward()
            else:
                with torch.no_grad():
                    layer(x)

    layer.backend = None  # follow attention_backend
    return call


def section_profile(ours: str, theirs: str, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for kind, batch in (("infer", 8), ("train", 8)):
        for name in (ours, theirs):
            model = create(name).train(kind == "train")
            call = (training_call if kind == "train" else inference_call)(model, batch, False)
            call()
            call()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) / 1e3
            what = "inference" if kind == "infer" else "training step"
            print(f"### Profile: {name}, {what}, batch {batch}, fp32 (self CPU total {total:.0f} ms)\n")
            print("| operator | self ms | calls |\n|---|---|---|")
            for event in events[:top]:
                print(f"| `{event.key}` | {event.self_cpu_time_total / 1e3:.1f} | {event.count} |")
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per row (median)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, the biformer_small pair only")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (both models compiled)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler tables")
    parser.add_argument("--no-layers", action="store_true",
                        help="skip the per-stage layer, depth-wise and downsampling conv tables")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (robust to other jobs with --threads 1)")
    parser.add_argument("--rows", metavar="KEYS", help=f"only these rows, comma-separated: {', '.join(ROWS)}")
    args = parser.parse_args()
    rows = parse_rows(args.rows)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rounds = 2 if args.quick else args.rounds
    pairs = PAIRS[:1] if args.quick else PAIRS
    print("## Machine\n")
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"load average (1/5/15 min) {load_average()}\n")
    print(f"| matmul 2048^3 | GFLOP/s |\n|---|---|\n| fp32 | {matmul_gflops(torch.float32):.0f} |\n"
          f"| bf16 | {matmul_gflops(torch.bfloat16):.0f} |\n")
    section_models([name for pair in pairs for name in pair])
    section_auto([ours for ours, _ in pairs])
    print("## Side by side\n")
    for ours, theirs in pairs:
        section_pair(ours, theirs, rounds, args.compile, rows)
    if not args.no_layers:
        section_layers(rounds + 1)
        section_depthwise(rounds + 1)
        section_downsample(rounds + 3)
    if args.profile:
        section_profile(*pairs[0], top=15)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
