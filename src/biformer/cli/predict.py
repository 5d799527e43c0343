"""biformer predict IMAGE...: the top-k classes of each image with their probabilities; for a segmentation or
detection checkpoint, the class map or the detected objects, with pictures written to --output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..train.inference import LoadedModel

from .common import report_error

EPILOG = """\
examples:
  biformer predict shirt.png --checkpoint runs/RUN/checkpoints/best.safetensors
  biformer predict cat.jpg dog.jpg --checkpoint biformer_tiny_in1k.pth --model biformer_tiny --top-k 3
Our checkpoints carry their class names and preprocessing; the authors' files need --model and get
ImageNet's class names and the model's ImageNet preprocessing (224 px, bicubic, crop 0.875).
  biformer predict scene.png --checkpoint runs/SEG-RUN/checkpoints/best.safetensors --output predictions
  biformer predict street.jpg --checkpoint runs/DET-RUN/checkpoints/best.safetensors --score-threshold 0.3
Segmentation checkpoints: the share of each class is printed; OUTPUT/STEM-classes.png (a palette PNG whose
pixel values are the class ids) and OUTPUT/STEM-overlay.png are written. Detection checkpoints: every object
scoring at least --score-threshold (label, score, box x0 y0 x1 y1) is printed and drawn in
OUTPUT/STEM-detections.png (with its mask for Mask R-CNN).
An image that cannot be read is reported on stderr; the others are still predicted (exit code 1).
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
    parser.add_argument("--output", default="predictions",
                        help="segmentation/detection: folder for the pictures (default: predictions)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="detection: the lowest score shown (default: 0.5)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..images import ImageError, open_image
    from ..train import ConfigError
    from ..train.inference import load_for_inference

    # the options first, then the checkpoint, then the images
    if args.top_k < 1:
        return report_error("predict", ValueError(f"--top-k: expected an integer >= 1, got {args.top_k}"))
    if not 0.0 <= args.score_threshold <= 1.0:
        return report_error("predict", ValueError(f"--score-threshold: expected a score in [0, 1], got "
                                                  f"{args.score_threshold}"))
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        return report_error("predict", ValueError(f"--device: {error}"))
    try:
        loaded = load_for_inference(args.checkpoint, args.model_name, dict(device=args.device))
        model = loaded.model.to(device)
    except (ConfigError, OSError, ValueError, RuntimeError) as error:
        return report_error("predict", error)
    if loaded.config.task != "classification":
        return predict_dense(args, loaded, model)
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


def _check_dense_arguments(args: argparse.Namespace) -> None:
    from pathlib import Path

    stems = [Path(path).stem for path in args.images]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(f"IMAGE: the pictures are named after the image, and several images are named "
                         f"{repeated}; predict them in separate runs or --output folders")


def predict_dense(args: argparse.Namespace, loaded: LoadedModel, model: torch.nn.Module) -> int:
    """Segmentation or detection: print what is found in each image and write its pictures to --output."""
    from pathlib import Path

    from torchvision.transforms.functional import to_tensor

    from ..dense import predict as dense
    from ..files import WriteError, make_folder
    from ..images import ImageError, open_image

    class_names = loaded.info["class_names"]
    output = Path(args.output)
    try:
        _check_dense_arguments(args)
        make_folder(output, "--output")
    except (ValueError, OSError) as error:  # WriteError is an OSError
        return report_error("predict", error)
    failures = 0
    for path in args.images:
        try:
            image = to_tensor(open_image(path, "RGB")).to(next(model.parameters()).device)  # (3, H, W) in [0, 1]
        except ImageError as error:
            print(f"biformer predict: {error}", file=sys.stderr)
            failures += 1
            continue
        stem = Path(path).stem
        try:
            if loaded.config.task == "segmentation":
                class_map = dense.segment(model, image)  # (H, W)
                found = dense.describe_class_map(class_map, class_names)
                dense.save_class_map(output / f"{stem}-classes.png", class_map, len(class_names))
                dense.save_overlay(output / f"{stem}-overlay.png", image, class_map, len(class_names))
                pictures = [f"{stem}-classes.png", f"{stem}-overlay.png"]
                lines = [f"  {item['fraction']:7.2%}  {item['label']}" for item in found]
            else:
                detections = dense.detect(model, image, args.score_threshold)
                found = dense.describe_detections(detections, class_names)
                dense.save_detections_picture(output / f"{stem}-detections.png", image, detections, class_names)
                pictures = [f"{stem}-detections.png"]
                lines = [f"  {item['score']:.2f}  {item['label']}  box {item['box']}" for item in found]
        except WriteError as error:
            return report_error("predict", error)
        if args.json:
            key = "classes" if loaded.config.task == "segmentation" else "objects"
            print(json.dumps({"image": path, key: found, "pictures": [str(output / name) for name in pictures]}))
        else:
            print(path + ("" if found else "  (nothing above --score-threshold)"))
            for line in lines:
                print(line)
    return 1 if failures else 0
