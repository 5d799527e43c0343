"""biformer predict IMAGE...: the top-k classes of each image with their probabilities."""

from __future__ import annotations

import argparse
import json
import sys

from .train import report_error

EPILOG = """\
examples:
  biformer predict shirt.png --checkpoint runs/RUN/checkpoints/best.safetensors
  biformer predict cat.jpg dog.jpg --checkpoint biformer_tiny_in1k.pth --model biformer_tiny --top-k 3
Our checkpoints carry their class names and preprocessing; the authors' files need --model and get
ImageNet's class names and the model's ImageNet preprocessing (224 px, bicubic, crop 0.875).
An image that cannot be read is reported on stderr; the others are still classified (exit code 1).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="classify images with a checkpoint (top-k labels and probabilities)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", required=True, help="weights file: ours (.safetensors) or the authors' (.pth)")
    parser.add_argument("--model", dest="model_name", metavar="MODEL",
                        help="timm model name, for weights files that are not our checkpoints")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..images import ImageError, open_image
    from ..train import ConfigError
    from ..train.inference import load_for_inference

    if args.top_k < 1:
        return report_error("predict", ValueError(f"--top-k: expected an integer >= 1, got {args.top_k}"))
    try:
        loaded = load_for_inference(args.checkpoint, args.model_name, dict(device=args.device))
        device = torch.device(args.device)
        model = loaded.model.to(device)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
        return report_error("predict", error)
    if loaded.config.task != "classification":  # dense prediction output is not implemented
        return report_error("predict", ValueError(
            f"checkpoint: {args.checkpoint} is a {loaded.config.task} checkpoint; biformer predict handles "
            f"classification checkpoints only (biformer eval reports its metrics)"))
    transform = loaded.task.transform(loaded.info, training=False)
    class_names = loaded.info.get("class_descriptions") or loaded.info["class_names"]
    mode = "L" if loaded.info["in_chans"] == 1 else "RGB"
    k = min(args.top_k, len(class_names))
    failures = 0
    for path in args.images:
        try:
            image = transform(open_image(path, mode)).unsqueeze(0).to(device)  # (1, C, H, W)
        except ImageError as error:
            print(f"biformer predict: {error}", file=sys.stderr)
            failures += 1
            continue
        with torch.inference_mode():
            probabilities = model(image).float().softmax(dim=-1)[0]  # (classes,)
        top = probabilities.topk(k)
        results = [(class_names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        if args.json:
            print(json.dumps(dict(image=path, top=[dict(label=label, probability=p) for label, p in results])))
        else:
            print(path)
            for label, probability in results:
                print(f"  {probability:7.2%}  {label}")
    return 1 if failures else 0
