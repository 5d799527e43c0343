"""Inference speed of exported BiFormer-T next to eager PyTorch, measured side by side in one run.

    python benchmarks/export_speed.py [--model biformer_tiny] [--batch-size 8] [--image-size 224] [--repeats 7]

Exports the model (random weights, ``gather`` backend) to ONNX, a torch.export program and a TorchScript trace
in a temporary folder, then times every runtime (and eager PyTorch with the gather backend and with the default
backend) in turn, ``--repeats`` rounds interleaved so that machine-load
drift hits all of them alike, and prints the median time per batch and the ratio to eager. CPU, 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch

import biformer  # noqa: F401 (registers the models)
from biformer.export import export_model, fixed_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="biformer_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".onnx", ".pt2", ".pt"):
            start = time.perf_counter()
            result = export_model(model, Path(folder) / f"model{suffix}", image_size=args.image_size)
            print(f"{result.format:>12}: exported and checked in {time.perf_counter() - start:5.1f} s, "
                  f"max abs difference {result.max_abs_diff:.1e} on a batch of {result.check_batch_size}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        # no busy-waiting of onnxruntime's threads after a run: it would steal the cores from the next runtime
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        program = torch.export.load(str(Path(folder) / "model.pt2")).module()
        traced = torch.jit.load(str(Path(folder) / "model.pt"))
        runners["eager (gather)"] = model
        runners["eager (default backend)"] = lambda x: default_backend_model(x)
        runners["torch.export"] = program
        runners["TorchScript"] = traced
        runners["onnxruntime"] = lambda x: session.run(None, {"images": x.numpy()})[0]
        default_backend_model = timm.create_model(args.model).eval()
        default_backend_model.load_state_dict(model.state_dict())
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.inference_mode(), fixed_backend(model, "gather"):
            for run in runners.values():  # warm-up
                run(images)
            for _ in range(args.repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(images)
                    times[name].append(time.perf_counter() - start)
    eager = statistics.median(times["eager (gather)"])
    print(f"\n{args.model}, batch {args.batch_size}, {args.image_size} px, CPU {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| runtime | ms / batch | images/s | time vs eager |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.0f} | {args.batch_size / median:.1f} | {median / eager:.2f}x |")


if __name__ == "__main__":
    main()
