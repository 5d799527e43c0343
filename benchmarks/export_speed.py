"""Inference speed of exported BiFormer next to eager PyTorch, at several image sizes, side by side in one run.

    python benchmarks/export_speed.py [--model biformer_tiny] [--batch-size 8] [--image-sizes 224 512]
                                      [--repeats 5] [--fixed]

Exports the model (random weights, ``gather`` backend) once with dynamic height and width (``dynamic_size=True``)
to ONNX and to a torch.export program in a temporary folder (``--fixed``: also one fixed-size ONNX file per
size), then, at every size, times each runtime in turn (eager PyTorch with the gather backend and with the
default backend, the .pt2 program, onnxruntime, and OpenVINO when it is importable), ``--repeats`` rounds
interleaved so that machine-load drift hits all of them alike, and prints the median time per batch and the
ratio to eager. CPU, 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import timm
import torch

import biformer  # noqa: F401 (registers the models)
from biformer.export import export_model, fixed_backend


def onnx_session(path: Path) -> Callable[[torch.Tensor], object]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    # no busy-waiting of onnxruntime's threads after a run: it would steal the cores from the next runtime
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def openvino_runner(path: Path) -> Callable[[torch.Tensor], object] | None:
    try:
        import openvino
    except ImportError:
        return None
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}  # not bf16 (its default here)
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    return lambda x: compiled(x.numpy())[0]


def timed(path: Path, **kwargs: object) -> None:
    start = time.perf_counter()
    result = export_model(**kwargs, path=path)
    print(f"{path.name:>16}: exported and checked in {time.perf_counter() - start:5.1f} s, max abs difference "
          f"{result.max_abs_diff:.1e} at {', '.join(f'{h}x{w}' for h, w in result.checked_sizes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="biformer_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixed", action="store_true", help="also time one fixed-size ONNX file per size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = timm.create_model(args.model).eval()
    default_backend_model = timm.create_model(args.model).eval()
    default_backend_model.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        timed(folder / "dynamic.onnx", model=model, dynamic_size=True)
        timed(folder / "dynamic.pt2", model=model, dynamic_size=True)
        if args.fixed:
            for size in args.image_sizes:
                timed(folder / f"fixed{size}.onnx", model=model, image_size=size)
        program = torch.export.load(str(folder / "dynamic.pt2")).module()
        runners: dict[str, Callable] = {
            "eager (gather)": model,
            "eager (default backend)": default_backend_model,
            "torch.export, dynamic size (.pt2)": program,
            "onnxruntime, dynamic size": onnx_session(folder / "dynamic.onnx"),
        }
        openvino = openvino_runner(folder / "dynamic.onnx")
        if openvino is not None:
            runners["OpenVINO, dynamic size"] = openvino
        results = {}
        for size in args.image_sizes:
            sized = dict(runners)
            if args.fixed:
                sized[f"onnxruntime, fixed {size} px"] = onnx_session(folder / f"fixed{size}.onnx")
            images = torch.randn(args.batch_size, 3, size, size)
            times: dict[str, list[float]] = {name: [] for name in sized}
            with torch.inference_mode(), fixed_backend(model, "gather"):
                for run in sized.values():  # warm-up
                    run(images)
                for _ in range(args.repeats):
                    for name, run in sized.items():
                        start = time.perf_counter()
                        run(images)
                        times[name].append(time.perf_counter() - start)
            results[size] = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.model}, batch {args.batch_size}, CPU {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| runtime | " + " | ".join(f"{size} px: ms / batch | vs eager" for size in args.image_sizes) + " |")
    print("|---|" + "---|---|" * len(args.image_sizes))
    names = list(dict.fromkeys(name for medians in results.values() for name in medians))
    for name in names:
        cells = []
        for size in args.image_sizes:
            median, eager = results[size].get(name), results[size]["eager (gather)"]
            cells += ["", ""] if median is None else [f"{median * 1000:.0f}", f"{median / eager:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
