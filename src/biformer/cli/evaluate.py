"""biformer eval: top-1/top-5 accuracy, per-class accuracy and a confusion matrix of a checkpoint (for
segmentation and detection checkpoints: mIoU or COCO mAP)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._optional import require
from ..files import atomic_write
from .common import add_config_flags, given_config_values, report_error

EPILOG = """\
Our checkpoints (RUN/checkpoints/*.safetensors) know their dataset and preprocessing: `biformer eval FILE`
re-evaluates on the run's evaluation split. Other weights (the authors' .pth) need --model and a dataset:
  biformer eval biformer_tiny_in1k.pth --model biformer_tiny --dataset imagefolder --data-dir imagenet \\
      --val-split val
Writes eval.json (all metrics, per-class accuracy, confusion matrix) and confusion.png to --output.
"""

DATA_FLAGS = ("dataset", "data_dir", "val_split", "download", "batch_size", "workers", "device", "precision",
              "threads", "progress", "input_size", "crop_pct", "interpolation", "val_scenes", "bad_images",
              "max_bad_images")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="weights file: ours (.safetensors) or another (then pass --model)")
    parser.add_argument("--model", dest="model_name", metavar="MODEL",
                        help="timm model name, for weights files that are not our checkpoints")
    parser.add_argument("--output", dest="output_dir", metavar="DIR",
                        help="where to write eval.json and confusion.png (default: CHECKPOINT_STEM-eval beside it)")
    add_config_flags(parser, DATA_FLAGS)
    parser.set_defaults(run=run)
    return parser


def plot_confusion(path: Path, confusion: list[list[int]], class_names: list[str]) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG; counts when few classes."""
    require("matplotlib", extra="cli", purpose="writing confusion.png").use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=np.float64)  # (true, predicted)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.5 * len(class_names), 30)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
    if len(class_names) <= 30:
        axis.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right")
        axis.set_yticks(range(len(class_names)), class_names)
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                if counts[row, column]:
                    color = "white" if rates[row, column] > 0.5 else "black"
                    axis.text(column, row, int(counts[row, column]), ha="center", va="center", fontsize=7, color=color)
    axis.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)


def _print_report(metrics: dict[str, Any], class_names: list[str], samples_name: str) -> None:
    print(f"{samples_name}: {metrics['samples']} images")
    print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
    width = max(len(name) for name in class_names)
    print("per-class top-1:")
    for name, value in zip(class_names, metrics["per_class_top1"]):
        print(f"  {name:<{width}}  {value:6.2f}%")


def _write_dense_report(checkpoint: str, output: Path, config: Any, architecture: str, info: dict[str, Any],
                        metrics: dict[str, Any]) -> None:
    """Segmentation / detection: the scalar metrics (mIoU ... or mAP ...) printed, everything in eval.json."""
    split = f"{config.options.val_scenes} validation scenes" if config.dataset == "scenes" else config.val_split
    print(f"{config.task} ({architecture}) on {config.dataset}, {split}:")
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            print(f"  {name:<20} {value:.4f}" if isinstance(value, float) else f"  {name:<20} {value}")
    report = dict(checkpoint=str(checkpoint), task=config.task, architecture=architecture, dataset=config.dataset,
                  data_dir=config.data_dir, split=split, class_names=info["class_names"], **metrics)
    _write_json(output / "eval.json", report)
    print(f"wrote {output / 'eval.json'}")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(document, indent=1)))


def _write_classification_report(checkpoint: str, output: Path, config: Any, info: dict[str, Any],
                                 metrics: dict[str, Any]) -> None:
    """Classification: top-1/top-5 and per-class accuracy printed; eval.json and confusion.png written."""
    class_names = info["class_names"]
    split = "test" if config.dataset == "fashion-mnist" else config.val_split
    _print_report(metrics, class_names, f"{config.dataset} {split}")
    report = dict(checkpoint=str(checkpoint), dataset=config.dataset, data_dir=config.data_dir,
                  split=split, class_names=class_names, **metrics)
    _write_json(output / "eval.json", report)
    plot_confusion(output / "confusion.png", metrics["confusion"], class_names)
    print(f"wrote {output / 'eval.json'} and {output / 'confusion.png'}")


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ..files import WriteError, make_folder
    from ..images import ImageError
    from ..train import ConfigError
    from ..train.data import DataError, SkipUnreadable
    from ..train.distributed import setup
    from ..train.engine import ShardSampler, evaluate
    from ..train.inference import load_for_inference

    require("tqdm", extra="cli", purpose="the progress display")  # before the checkpoint and the data are read
    try:
        overrides = given_config_values(args)
        loaded = load_for_inference(args.checkpoint, args.model_name, overrides)
        config, task, info = loaded.config, loaded.task, loaded.info
        checkpoint = Path(args.checkpoint)
        output = Path(args.output_dir) if args.output_dir else checkpoint.with_name(checkpoint.stem + "-eval")
        make_folder(output, "--output")
        if config.threads:
            torch.set_num_threads(config.threads)
        dist = setup(config.device)
        data = task.build_data(("eval",), info)
        images = SkipUnreadable(data.eval, config.bad_images, config.max_bad_images, "eval")  # as in training
        loader = DataLoader(images, batch_size=config.batch_size, num_workers=config.workers,
                            collate_fn=data.collate_fn, sampler=ShardSampler(images, dist.rank, dist.world_size))
        metrics = evaluate(loaded.model.to(dist.device), loader, task.new_metrics(info), dist, config.precision,
                           config.progress and dist.is_main)
        found = dist.all_reduce_sum(images.unreadable.to(dist.device, torch.float32))  # (N,) processes' findings
        metrics["unreadable_images"] = [images.source(int(index)) for index in found.nonzero().flatten()]
        dist.shutdown()
    except (ConfigError, DataError, ImageError, OSError, ValueError) as error:  # OSError: WriteError, names too long
        return report_error("eval", error)
    if dist.is_main and metrics["unreadable_images"]:
        skipped = metrics["unreadable_images"]
        print(f"unreadable images skipped (each replaced by the next readable one): {len(skipped)}, e.g. "
              f"{', '.join(skipped[:3])}; all in eval.json")
    try:
        if dist.is_main and config.task != "classification":
            _write_dense_report(args.checkpoint, output, config, task.architecture, info, metrics)
        elif dist.is_main:
            _write_classification_report(args.checkpoint, output, config, info, metrics)
    except WriteError as error:  # e.g. the disk filled up during the evaluation
        return report_error("eval", error)
    return 0
