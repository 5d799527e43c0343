"""Classify an image with BiFormer-T through timm (the authors' weights if you have the file).

    python examples/classify.py [IMAGE] [--checkpoint biformer_tiny_in1k.pth]

Without --checkpoint the weights are random (the released files cannot be downloaded any more), so the
labels are meaningless; the point is the pipeline: timm preprocessing, model, top-5 ImageNet labels.
Without IMAGE a synthetic picture is used.
"""

from __future__ import annotations

import argparse

import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import biformer  # noqa: F401  (registers the models with timm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", help="image file (default: a synthetic picture)")
    parser.add_argument("--checkpoint", help="the authors' biformer_tiny file (.pth) or a .safetensors file")
    parser.add_argument("--model", default="biformer_tiny", choices=biformer.MODEL_NAMES)
    args = parser.parse_args()

    overlay = dict(file=args.checkpoint) if args.checkpoint else None
    model = timm.create_model(args.model, pretrained=bool(args.checkpoint), pretrained_cfg_overlay=overlay).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        ramp = torch.linspace(0, 255, 256).to(torch.uint8)
        pixels = torch.stack([ramp.expand(256, 256), ramp.expand(256, 256).T, ramp.flip(0).expand(256, 256)], -1)
        image = Image.fromarray(pixels.numpy())
    with torch.inference_mode():
        probabilities = model(transform(image).unsqueeze(0)).softmax(-1)[0]
    info = ImageNetInfo()
    top = probabilities.topk(5)
    print(f"{args.model} ({'weights: ' + args.checkpoint if args.checkpoint else 'random weights'})")
    for p, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:6.2%}  {info.index_to_description(index)}")


if __name__ == "__main__":
    main()
