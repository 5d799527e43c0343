"""GPU benchmark of every attention backend, side by side in one run (needs a CUDA GPU).

    python benchmarks/bench_gpu.py                       # everything, writes benchmarks/RESULTS_GPU.md
    python benchmarks/bench_gpu.py --quick               # fewer rounds and configurations (a few minutes)
    python benchmarks/bench_gpu.py --sections check layers --output /tmp/gpu.md

(from the repository root, with ``PYTHONPATH=src`` or the package installed). Without CUDA it refuses in
one line.

Sections, each a Markdown table on stdout and in ``--output``:

1. ``check``: the ``triton`` backend against the float64 ``gather`` backend on the GPU, forward and every
   gradient, per dtype (max absolute error), on the stage shapes at batch 2: run first, so that the
   timings below are known to time a correct kernel;
2. ``layers``: the routed attention alone (``routed_attention_heads``) at the BRA stage shapes of
   biformer_tiny and biformer_small (the two share their stage shapes; they differ in depth) at 224 and
   512 px, forward (no grad) and forward + backward, fp32 and bf16, each batch size;
3. ``models``: whole biformer_tiny / biformer_small, inference (eval, no grad) and a training step's
   forward + backward (train mode), fp32 and bf16 autocast, each image size and batch size.

Every row times all backends in turns over ``--rounds`` rounds (the best round's median is kept), so the
ratios compare runs made under the same conditions. Cells: median milliseconds and, in brackets, the
speed-up over ``reference`` (the authors' formulation); the memory table gives the peak extra CUDA memory
of one call (``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated before it).
``flex`` runs under ``torch.compile`` (``dynamic=False``; compile time not counted); ``auto`` is what the
library picks today. A configuration that does not fit in memory shows ``OOM``; one that fails shows
``error`` with a footnote.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

BACKENDS = ("reference", "gather", "sdpa", "dense", "flex", "triton", "auto")
MODELS = {"biformer_tiny": (2, 2, 8, 2), "biformer_small": (4, 4, 18, 4)}  # blocks per stage
EMBED_DIMS = (64, 128, 256, 512)
TOPKS = (1, 4, 16, -2)  # -2: plain attention (stage 4), not BRA
N_WIN = 7
HEAD_DIM = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = "cuda"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS_GPU.md"


# --- pure parts (tested on CPU) -----------------------------------------------------------------------
@dataclass(frozen=True)
class StageShape:
    """The routed attention of one BRA stage: q, k, v are (heads, batch, regions, tokens, head_dim)."""

    image_size: int
    stage: int  # 1-based
    map_size: int  # side of the stage's feature map
    padded_size: int  # after auto_pad to a multiple of n_win
    heads: int
    regions: int
    tokens: int  # per region
    head_dim: int
    topk: int
    blocks: dict[str, int]  # BRA blocks of this shape per model

    @property
    def label(self) -> str:
        side = self.padded_size // N_WIN
        pad = f", padded from {self.map_size}" if self.padded_size != self.map_size else ""
        return (
            f"{self.image_size} px stage {self.stage}: {self.heads} heads, {self.regions} regions of "
            f"{side}x{side} tokens{pad}, top-{self.topk}"
        )


def stage_map_size(image_size: int, stage: int) -> int:
    """Side of stage ``stage``'s (1-based) map: the stem halves twice, each downsampling once (stride-2 convs)."""
    size = image_size
    for _ in range(stage + 1):
        size = math.ceil(size / 2)
    return size


def stage_shapes(image_size: int) -> list[StageShape]:
    """The BRA stage shapes of biformer_tiny and biformer_small at ``image_size`` (the models share them)."""
    shapes = []
    for index, (dim, topk) in enumerate(zip(EMBED_DIMS, TOPKS)):
        if topk <= 0:
            continue
        map_size = stage_map_size(image_size, index + 1)
        padded = math.ceil(map_size / N_WIN) * N_WIN
        shapes.append(
            StageShape(
                image_size=image_size, stage=index + 1, map_size=map_size, padded_size=padded,
                heads=dim // HEAD_DIM, regions=N_WIN**2, tokens=(padded // N_WIN) ** 2, head_dim=HEAD_DIM,
                topk=topk, blocks={name: depth[index] for name, depth in MODELS.items()},
            )
        )
    return shapes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=("check", "layers", "models"),
                        default=["check", "layers", "models"])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--layer-batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--model-batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="turns over all backends per row (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend per round (default 10)")
    parser.add_argument("--no-compile", action="store_true", help="leave out flex (torch.compile) everywhere")
    parser.add_argument("--quick", action="store_true",
                        help="1 round of 5 calls, batches 1 and 64, flex only in the layer rows")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"Markdown file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    for name in ("image_sizes", "layer_batches", "model_batches"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: expected positive integers, got {getattr(args, name)}")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats: expected positive integers, got {args.rounds} and {args.repeats}")
    if args.quick:
        args.rounds, args.repeats = 1, 5
        args.layer_batches = [1, 64]
    if args.no_compile:
        args.backends = [b for b in args.backends if b != "flex"]
    return args


def cell(ms: float | str, reference_ms: float | str | None) -> str:
    """``"1.23 (4.5x)"``: milliseconds and the speed-up over the reference (or the failure word)."""
    if isinstance(ms, str):
        return ms
    text = f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
    if isinstance(reference_ms, float):
        text += f" ({reference_ms / ms:.2g}x)"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- measuring (CUDA) ---------------------------------------------------------------------------------
class Failure(Exception):
    """A configuration that could not be measured (``OOM`` or ``error``)."""


def run_guarded(function: Callable[[], object], notes: list[str], what: str) -> object:
    try:
        return function()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise Failure("OOM") from None
    except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
        torch.cuda.empty_cache()
        notes.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        raise Failure(f"error [{len(notes)}]") from None


def median_ms(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(function: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def build_all(builders: dict[str, Callable[[], Callable[[], object]]], notes: list[str], what: str) -> dict:
    """Each backend's timed function, or the word (``OOM`` / ``error [n]``) saying why it could not be built."""
    built: dict[str, Callable[[], object] | str] = {}
    for name, build in builders.items():
        try:
            built[name] = run_guarded(build, notes, f"{what}, {name}")
        except Failure as failure:
            built[name] = str(failure)
    return built


def measure_side_by_side(
    functions: dict[str, Callable[[], object] | str], args: argparse.Namespace, notes: list[str], what: str
) -> tuple[dict[str, float | str], dict[str, float | str]]:
    """Best-round median ms and peak extra MiB per backend; the backends take turns."""
    times: dict[str, float | str] = {}
    memory: dict[str, float | str] = {}
    live = {}
    for name, function in functions.items():  # warm-up (and compile), memory
        if isinstance(function, str):
            times[name] = memory[name] = function
            continue
        try:
            for _ in range(3):
                run_guarded(function, notes, f"{what}, {name}")
            memory[name] = run_guarded(lambda f=function: peak_extra_mib(f), notes, f"{what}, {name}")
            live[name] = function
            times[name] = float("inf")
        except Failure as failure:
            times[name] = memory[name] = str(failure)
    for _ in range(args.rounds):
        for name, function in live.items():
            if isinstance(times[name], str):
                continue
            try:
                result = run_guarded(lambda f=function: median_ms(f, args.repeats), notes, f"{what}, {name}")
                times[name] = min(times[name], result)
            except Failure as failure:
                times[name] = str(failure)
    return times, memory


def random_routing(batch: int, regions: int, topk: int, device: torch.device) -> torch.Tensor:
    """int64 (batch, regions, topk): distinct routed regions per query region."""
    return torch.rand(batch, regions, regions, device=device).topk(topk, dim=-1).indices


def layer_inputs(shape: StageShape, batch: int, dtype: torch.dtype, device: torch.device, grad: bool):
    def make(length: int) -> torch.Tensor:
        x = torch.randn(shape.heads, batch, shape.regions, length, shape.head_dim, device=device, dtype=dtype)
        return x.requires_grad_(grad)

    return make(shape.tokens), make(shape.tokens), make(shape.tokens), random_routing(
        batch, shape.regions, shape.topk, device
    )


def layer_function(backend: str, shape: StageShape, batch: int, dtype: torch.dtype, train: bool):
    from biformer.ops import routed_attention_heads

    device = torch.device(DEVICE)
    query, key, value, topk_index = layer_inputs(shape, batch, dtype, device, train)
    scale = (shape.heads * shape.head_dim) ** -0.5  # the BRA scale: qk_dim ** -0.5

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return routed_attention_heads(q, k, v, index, scale=scale, backend=backend)

    if backend == "flex":
        attend = torch.compile(attend, dynamic=False)
    if not train:
        def forward() -> None:
            with torch.no_grad():
                attend(query, key, value, topk_index)

        return forward
    grad_out = torch.randn(shape.heads, batch, shape.regions, shape.tokens, shape.head_dim, device=device, dtype=dtype)

    def forward_backward() -> None:
        for t in (query, key, value):
            t.grad = None
        attend(query, key, value, topk_index).backward(grad_out)

    return forward_backward


def model_function(backend: str, model_name: str, size: int, batch: int, dtype: torch.dtype, train: bool):
    import timm

    import biformer  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model(model_name, backend=backend).to(DEVICE).train(train)
    runner = torch.compile(model, dynamic=False) if backend == "flex" else model
    images = torch.randn(batch, 3, size, size, device=DEVICE)

    def call() -> None:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            if train:
                model.zero_grad(set_to_none=True)
                runner(images).float().mean().backward()
            else:
                with torch.no_grad():
                    runner(images)

    return call


def _forward_backward(
    tensors: tuple[torch.Tensor, ...], topk_index: torch.Tensor, grad_out: torch.Tensor, scale: float, backend: str,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of ``backend`` on copies of q, k, v cast to ``dtype``."""
    from biformer.ops import routed_attention_heads

    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = routed_attention_heads(*leaves, topk_index, scale=scale, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype))]


def check_triton(shapes: list[StageShape], dtypes: list[str], notes: list[str]) -> str:
    """Max |error| of triton's output and gradients against float64 gather, per shape and dtype
    ("kernels ran": no means the backend used its gather fallback, see biformer.ops.backends.triton)."""
    from biformer.ops.backends.triton import triton_can_run

    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            query, key, value, topk_index = layer_inputs(shape, 2, dtype, torch.device(DEVICE), True)
            grad_out = torch.randn_like(query)
            scale = (shape.heads * shape.head_dim) ** -0.5

            run = partial(_forward_backward, (query, key, value), topk_index, grad_out, scale)

            def compare(run: Callable[[str, torch.dtype], list[torch.Tensor]] = run, dtype: torch.dtype = dtype):
                actual, again = run("triton", dtype), run("triton", dtype)
                return actual, run("gather", torch.float64), all(torch.equal(a, b) for a, b in zip(actual, again))

            try:
                actual, expected, deterministic = run_guarded(compare, notes, f"check {shape.label}, {dtype_name}")
            except Failure as failure:
                rows.append([shape.label, dtype_name, str(failure)])
                continue
            errors = [f"{(a.double() - e).abs().max().item():.1e}" for a, e in zip(actual, expected)]
            ran = triton_can_run(query.to(dtype), key.to(dtype), value.to(dtype))
            rows.append([shape.label, dtype_name, *errors, "yes" if deterministic else "NO", "yes" if ran else "NO"])
    header = ["shape (batch 2)", "dtype", "out", "dq", "dk", "dv", "backward bit-identical", "kernels ran"]
    return markdown_table(header, [row + [""] * (len(header) - len(row)) for row in rows])


def timing_tables(
    rows: list[tuple[list[str], dict[str, float | str], dict[str, float | str]]], first_columns: list[str],
    backends: list[str],
) -> str:
    header = [*first_columns, *backends]
    time_rows = [
        [*labels, *(cell(times[b], times.get("reference")) for b in backends)] for labels, times, _ in rows
    ]
    memory_rows = [
        [*labels, *(m if isinstance(m := memory[b], str) else f"{m:,.0f}" for b in backends)]
        for labels, _, memory in rows
    ]
    return (
        "Median ms (speed-up over `reference`):\n\n" + markdown_table(header, time_rows)
        + "\n\nPeak extra CUDA memory of one call, MiB:\n\n" + markdown_table(header, memory_rows)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: error: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU figures are in benchmarks/RESULTS.md", file=sys.stderr)
        return 2
    import biformer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every backend
    torch.backends.cudnn.allow_tf32 = False
    notes: list[str] = []
    started = time.time()
    gpu = torch.cuda.get_device_name()
    sections = [
        "# GPU benchmark of the attention backends",
        "",
        f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; biformer {biformer.__version__}; "
        f"command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
        f"TF32 off. {args.rounds} round(s) of {args.repeats} timed calls per backend and row.",
    ]

    def emit(text: str) -> None:
        print(text, flush=True)
        sections.append(text)
        args.output.write_text("\n".join(sections) + "\n")  # after every section: a cut-short run keeps its tables

    print("\n".join(sections), flush=True)
    shapes = [shape for size in args.image_sizes for shape in stage_shapes(size)]
    if "check" in args.sections and "triton" in args.backends:
        emit("\n## triton against float64 gather on this GPU (max absolute error)\n")
        emit(check_triton(shapes, args.dtypes, notes))
    if "layers" in args.sections:
        rows = []
        for shape in shapes:
            for dtype_name in args.dtypes:
                for train in (False, True):
                    for batch in args.layer_batches:
                        what = f"{shape.label}, {dtype_name}, {'fwd+bwd' if train else 'fwd'}, batch {batch}"
                        functions = build_all(
                            {b: partial(layer_function, b, shape, batch, DTYPES[dtype_name], train)
                             for b in args.backends},
                            notes, what,
                        )
                        times, memory = measure_side_by_side(functions, args, notes, what)
                        del functions
                        labels = [shape.label, dtype_name, "fwd+bwd" if train else "fwd", str(batch)]
                        rows.append((labels, times, memory))
                        torch._dynamo.reset()
        emit("\n## Routed attention at the stage shapes of biformer_tiny / biformer_small\n")
        emit(timing_tables(rows, ["shape", "dtype", "pass", "batch"], args.backends))
    if "models" in args.sections:
        rows = []
        model_backends = [b for b in args.backends if not (args.quick and b == "flex")]
        for model_name in args.models:
            for size in args.image_sizes:
                for dtype_name in args.dtypes:
                    for train in (False, True):
                        for batch in args.model_batches:
                            what = f"{model_name}, {size} px, {dtype_name}, {'fwd+bwd' if train else 'fwd'}, {batch}"
                            built = build_all(
                                {b: partial(model_function, b, model_name, size, batch, DTYPES[dtype_name], train)
                                 for b in model_backends},
                                notes, what,
                            )
                            times, memory = measure_side_by_side(built, args, notes, what)
                            del built
                            torch._dynamo.reset()
                            torch.cuda.empty_cache()
                            labels = [model_name, f"{size} px", dtype_name, "fwd+bwd" if train else "fwd", str(batch)]
                            rows.append((labels, times, memory))
        emit("\n## Whole models (bf16: autocast; fwd+bwd: train mode, backward of the mean logit)\n")
        emit(timing_tables(rows, ["model", "image", "dtype", "pass", "batch"], model_backends))
    if notes:
        emit("\nErrors:\n\n" + "\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1)))
    emit(f"\nWall time of the run: {time.time() - started:.0f} s.")
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
