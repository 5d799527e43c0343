"""biformer train: train a model; with no arguments, BiFormer-Nano on Fashion-MNIST (the quick start)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the shared helpers (one_line, report_error are also importable from here, as before)
from .common import add_config_flags, given_config_values, one_line, report_error  # noqa: F401

EPILOG = """\
Options are read from the defaults, then --config FILE (YAML, option: value), then the flags given here.
The resolved configuration is written to RUN/config.yaml; the run folder also gets metrics.csv,
metrics.json, metrics.png and checkpoints/ (last, best, training-state.pt).

examples:
  biformer train                                         # Fashion-MNIST, biformer_nano, about 8 epochs
  biformer train --list-configs                          # the shipped recipes (the authors' ImageNet-1k, COCO, ADE20K)
  torchrun --nproc_per_node=8 -m biformer train --config imagenet/biformer_small --data-dir /data/imagenet
  biformer train --dataset imagefolder --data-dir DATA --model biformer_tiny --input-size 224 \\
      --pretrained biformer_tiny_in1k.pth --epochs 30 --mixup 0.8 --cutmix 1.0 --model-ema
  biformer train --resume runs/fashion-mnist-biformer_nano-20250101-120000
  torchrun --nproc_per_node=2 -m biformer train --threads 1
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a model (no arguments: BiFormer-Nano on Fashion-MNIST)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of options, or a shipped recipe's name such as imagenet/biformer_small "
                             "(flags override it)")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the shipped recipes (names for --config) and exit")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN exactly where it stopped")
    add_config_flags(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..images import ImageError
    from ..train import ConfigError, Trainer, load_config, load_yaml
    from ..train.data import DataError
    from ..train.resume import check_resume_values

    if getattr(args, "list_configs", False):
        return _list_configs()
    try:
        layers = []
        run_dir = None
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").is_file():
                raise FileNotFoundError(f"--resume: {run_dir} is not a run folder (no config.yaml in it)")
            layers.append((load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml")))
        if args.config:
            from ..train.recipes import resolve_config

            layers.append((load_yaml(resolve_config(args.config)), args.config))
        layers.append((given_config_values(args), "flags"))
        if run_dir is not None:  # every option given on resume applies or is refused, never silently ignored
            check_resume_values(layers[0][0], {k: v for values, _ in layers[1:] for k, v in values.items()},
                                str(run_dir))
        config = load_config(*layers)
        with Trainer(config, resume=run_dir is not None, run_dir=run_dir) as trainer:
            trainer.fit()
    except (ConfigError, DataError, ImageError, OSError, FloatingPointError,
            ValueError) as error:  # ValueError: unreadable --pretrained or training state; OSError: WriteError, ...
        return report_error("train", error)
    return 0


def _list_configs() -> int:
    """Print the shipped recipes, one per line: name and what it trains."""
    from ..train.recipes import config_description, list_configs

    names = list_configs()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {config_description(name)}")
    print("use: biformer train --config NAME --data-dir DIR (files in biformer/configs; flags override them)")
    return 0
