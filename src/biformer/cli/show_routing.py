"""``biformer show-routing IMAGE --point X,Y``: a PNG of where each BRA stage routes the query points.

For each point (rows) and BRA stage (columns): the image, the query token's region (dashed), its top-k routed
regions numbered by rank (1 = highest routing score) and the token's attention over the routed keys.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..hub import load_model
from ..images import open_image
from .common import one_line, positive_int

COMMAND = "show-routing"


def parse_point(text: str) -> tuple[float, float]:
    """``"X,Y"`` (pixels of the original image, numbers) -> (x, y)."""
    parts = text.split(",")
    try:
        x, y = (float(part) for part in parts)
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels of the image (e.g. 120,80), got {text!r}")
    return x, y


MAX_DPI = 1200


def dpi_value(text: str) -> int:
    """A command-line resolution in dots per inch, 1 to ``MAX_DPI`` (a huge one cannot be drawn in memory)."""
    value = positive_int(text)
    if value > MAX_DPI:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DPI} dots per inch, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND,
        help="draw BRA routing and attention for query points of an image (PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("--point", action="append", required=True, type=parse_point, metavar="X,Y",
                        help="query point in pixels of the image (repeat for several)")
    parser.add_argument("--model", help="model name (default biformer_tiny) or a folder in the Hub layout")
    parser.add_argument("--checkpoint", help="weights: the authors' .pth, a .safetensors file or a Hub-layout folder "
                                             "(without it the weights are random)")
    parser.add_argument("--output", "-o", help="PNG to write (default: IMAGE_STEM-routing.png here)")
    parser.add_argument("--image-size", type=positive_int,
                        help="shorter side of the model input in pixels (default: the model's, 224)")
    parser.add_argument("--layers", help="comma-separated BRA module names (default: the last of each stage)")
    parser.add_argument("--dpi", type=dpi_value, default=150, help="resolution of the PNG (default 150)")
    parser.set_defaults(run=run)
    return parser


def output_path(output: str | None, image: str) -> Path:
    """The PNG path, checked to be writable before any work is done."""
    path = Path(output) if output else Path(f"{Path(image).stem}-routing.png")
    if path.is_dir():
        raise ValueError(f"--output: {path} is a folder, expected a .png file path")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output: expected a .png file, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"--output: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--output: the folder {path.parent} is not writable")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        output = output_path(args.output, args.image)
        model = load_model(args.model, args.checkpoint)  # the model name and weights before the image is read
        image = open_image(args.image)
        if args.checkpoint is None and (args.model is None or not Path(args.model).is_dir()):
            print(f"biformer {COMMAND}: warning: no --checkpoint, the weights are random: the picture shows an "
                  "untrained model's routing", file=sys.stderr)
        from ..visualize import show_routing  # needs matplotlib

        layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
        figure = show_routing(model, image, args.point, layers=layers, image_size=args.image_size)
        temporary = output.with_name(f".{output.stem}.tmp.png")
        try:
            figure.savefig(temporary, dpi=args.dpi)
            os.replace(temporary, output)
        finally:
            temporary.unlink(missing_ok=True)
    except (ValueError, OSError, ImportError, MemoryError) as error:
        print(f"biformer {COMMAND}: error: {one_line(str(error) or type(error).__name__)}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({len(args.point)} point(s) x {len(figure.axes) // len(args.point)} BRA layer(s))")
    return 0
