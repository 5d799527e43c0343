"""biformer train: train a model; with no arguments, BiFormer-Nano on Fashion-MNIST (the quick start)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per :class:`~biformer.train.config.TrainConfig` field (all of them, or ``names``).

    Flags default to ``argparse.SUPPRESS``: only the ones given appear in the namespace, so they override
    the configuration file without hiding it.
    """
    from ..train.config import TrainConfig, config_fields, is_flag_switch, parse_flag_value

    wanted = set(names) if names is not None else None
    group = parser.add_argument_group("configuration options (also valid as keys of the YAML file)")
    default_config = TrainConfig()
    for config_field in config_fields():
        if wanted is not None and config_field.name not in wanted:
            continue
        flag = "--" + config_field.name.replace("_", "-")
        default = getattr(default_config, config_field.name)
        help_text = f"{config_field.metadata['help']} (default: {default})"
        if is_flag_switch(config_field):
            group.add_argument(flag, dest=config_field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=config_field.name, default=argparse.SUPPRESS, help=help_text,
                               metavar=config_field.name.upper(), type=_converter(config_field, parse_flag_value))


def _converter(config_field: Any, parse: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        from ..train.config import ConfigError

        try:
            return parse(config_field, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from error

    return convert


def given_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration options given as flags."""
    from ..train.config import config_fields

    return {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}


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


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x85``): a message that
    quotes a value given by the user stays one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def report_error(command: str, error: BaseException) -> int:
    """Print ``error`` as a one-line command error; exit code 2.

    An error raised in a data-loading worker process reaches us with the worker's traceback in its message
    (torch's ``DataLoader`` re-raises it so); only the original message, its last line, is shown.
    """
    message = str(error)
    if "\nOriginal Traceback" in message:
        kind, _, text = message.rstrip().splitlines()[-1].partition(": ")  # "module.ErrorType: the message"
        message = text if text and " " not in kind else kind
    print(f"biformer {command}: error: {one_line(message)}", file=sys.stderr)
    return 2


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
