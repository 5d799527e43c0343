"""``biformer export``: write a model as ONNX, a torch.export program (.pt2) or a TorchScript trace (.pt).

The batch size is dynamic. The image size is fixed in the file, or with ``--dynamic-size`` (ONNX, .pt2) any
height and width in the range the command prints. The file is checked against the eager model on a batch of
another size (ONNX through onnxruntime on CPU) and written only if it matches. ONNX files come from torch's
dynamo exporter (``torch.onnx.export(..., dynamo=True)``), the one supported here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.nn as nn

from ..export import (
    DEFAULT_MAX_SIZE,
    DEFAULT_OPSET,
    EXPORT_BACKEND,
    FORMATS,
    ExportCheckError,
    check_export_options,
    export_model,
)
from ..hub import load_model
from ..ops import available_backends
from .common import one_line, positive_int

COMMAND = "export"


def parse_image_size(text: str) -> int | tuple[int, int]:
    """``"224"`` or ``"HxW"`` (e.g. ``"224x320"``)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels (e.g. 224 or 224x320), got {text!r}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


MAX_EXAMPLE_BATCH = 64


def example_batch(text: str) -> int:
    """``--batch-size``: at most ``MAX_EXAMPLE_BATCH`` (the example only shapes the graph; the batch stays dynamic;
    below 2 the export itself refuses it)."""
    value = positive_int(text)
    if value > MAX_EXAMPLE_BATCH:
        raise argparse.ArgumentTypeError(f"expected an example batch of at most {MAX_EXAMPLE_BATCH} (the exported "
                                         f"batch size stays dynamic), got {text!r}")
    return value


def check_output_file(text: str) -> None:
    """Refuse, before any work, an output that is a folder or lies in a folder that is missing or read-only."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(f"--output: {text} is a folder; expected a file path such as {path / 'model.onnx'}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"--output: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--output: the folder {folder} is not writable")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND,
        help="export a model to ONNX, torch.export (.pt2) or TorchScript (.pt), checked against the eager model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", "-o", required=True, help="file to write: .onnx, .pt2 or .pt")
    parser.add_argument("--format", choices=tuple(FORMATS), help="default: from the output suffix")
    parser.add_argument("--model", help="model name (default biformer_tiny) or a folder in the Hub layout")
    parser.add_argument("--checkpoint", help="weights: the authors' .pth, a .safetensors file or a Hub-layout folder "
                                             "(without it the weights are random)")
    parser.add_argument("--image-size", type=parse_image_size, help="SIZE or HxW (default: the model's, 224)")
    parser.add_argument("--batch-size", type=example_batch, default=2, help="example batch (>= 2; stays dynamic)")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 17, default "
                                                                                  f"{DEFAULT_OPSET})")
    parser.add_argument("--backend", default=EXPORT_BACKEND, choices=available_backends()[1:],
                        help=f"attention backend in the exported graph (default {EXPORT_BACKEND})")
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance of the check (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip running the file against the eager model")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="height and width dynamic too (ONNX, .pt2): the file takes every size in the printed "
                             "range; not with --image-size")
    parser.add_argument("--max-size", type=positive_int, default=DEFAULT_MAX_SIZE,
                        help=f"largest height and width of a --dynamic-size file (default {DEFAULT_MAX_SIZE})")
    parser.set_defaults(run=run)
    return parser


def build_model(name: str | None, checkpoint: str | None) -> nn.Module:
    """The model to export, from ``--model`` and ``--checkpoint``: one call, so that a loader taking any
    checkpoint can replace it. Every registered model name is accepted (``biformer_nano`` included)."""
    return load_model(name, checkpoint)


def run(args: argparse.Namespace) -> int:
    try:
        if args.dynamic_size and args.image_size is not None:
            raise ValueError("--image-size: a --dynamic-size file takes every size in its range; leave it out")
        # the options and the output folder first, then the model and its weights file
        check_output_file(args.output)
        check_export_options(args.output, args.format, args.batch_size, args.opset, args.atol, args.dynamic_size)
        model = build_model(args.model, args.checkpoint)
        if args.checkpoint is None and (args.model is None or not Path(args.model).is_dir()):
            print(f"biformer {COMMAND}: warning: no --checkpoint, exporting random weights", file=sys.stderr)
        result = export_model(
            model, args.output, format=args.format, image_size=args.image_size, batch_size=args.batch_size,
            opset=args.opset, backend=args.backend, check=not args.no_check, atol=args.atol,
            dynamic_size=args.dynamic_size, max_size=args.max_size,
        )
    except (ValueError, OSError, ImportError, ExportCheckError) as error:
        print(f"biformer {COMMAND}: error: {one_line(str(error))}", file=sys.stderr)
        return 1
    if result.size_range is not None:
        smallest, largest = result.size_range
        print(f"wrote {result.path} ({result.format}, any height and width from {smallest} to {largest} px, "
              f"dynamic batch size)")
    else:
        height, width = result.image_size
        print(f"wrote {result.path} ({result.format}, {height}x{width} images, dynamic batch size)")
    if result.max_abs_diff is not None:
        sizes = ", ".join(f"{h}x{w}" for h, w in result.checked_sizes)
        print(f"checked on a batch of {result.check_batch_size} at {sizes}: max abs difference to the eager model "
              f"{result.max_abs_diff:.2e}")
    return 0
