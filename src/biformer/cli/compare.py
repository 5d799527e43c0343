"""biformer compare: attention types side by side (cost per image size, accuracy after the same budget)."""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime

from .._optional import require

BUDGET_EPOCHS_BOUND = 100  # --budget-minutes without --epochs: the time ends a run, not the epochs

EPILOG = """\
Cost (task "cost"): GFLOPs (torch's FlopCounterMode: matmuls, convolutions, SDPA; not gather/grid_sample),
parameters, images/s (types taking turns, median) and peak extra memory (a fresh process per point) of
--model (default biformer_tiny) at each --sizes. Accuracy (tasks "classification", "segmentation"): the
`biformer train` recipe for --epochs over a fixed training set (--train-samples Fashion-MNIST images,
--train-scenes scenes), or for --budget-minutes of wall clock per run, one run per type and seed, on
--model (default biformer_nano; the scenes use the engine's "shallow" backbone).

Writes RUN/results.json, results.csv, table.md, cost.png, accuracy.png and prints the table.

examples:
  biformer compare --threads 1 --output runs/compare                       # everything (about 25 minutes)
  biformer compare --tasks cost --sizes 224 512 --attn-types bra global window
  biformer compare --tasks classification --seeds 0 1 2 --epochs 1 --train-samples 5000
"""


def _names(text: str) -> list[str]:
    """``"a,b"`` or ``"a"`` -> the list of names (both spellings are accepted for list options)."""
    return [name for name in text.split(",") if name]


def _mapping(text: str) -> dict:
    """YAML/JSON text of a mapping (``--model-kwargs``)."""
    yaml = require("yaml", extra="cli", purpose="--model-kwargs")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "not YAML"
        raise argparse.ArgumentTypeError(f"expected a YAML mapping, got {text!r} ({reason})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{n_win: 2}}', got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..comparison import TASKS

    parser = subparsers.add_parser(
        "compare", help="compare attention types: cost per image size and accuracy after the same budget",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--attn-types", nargs="+", type=_names, metavar="TYPE",
                        help="attention types to compare (default: all of biformer.layers.ATTENTION_TYPES)")
    parser.add_argument("--tasks", nargs="+", type=_names, metavar="TASK",
                        help=f"what to measure, of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--output", metavar="RUN", help="run folder for the results (default: runs/compare-TIME)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; the machine is shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    parser.add_argument("--model", help="timm model for every task (default: biformer_tiny for the cost, "
                                        "biformer_nano for classification)")
    cost = parser.add_argument_group("cost")
    cost.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024], metavar="PX",
                      help="image sides in pixels (default: 224 512 1024)")
    cost.add_argument("--batch-size", type=int, default=1, help="images per call (default: 1)")
    cost.add_argument("--repeats", type=int, default=3, help="timed calls per type and size (default: 3)")
    cost.add_argument("--memory-limit-gib", type=float, default=8.0,
                      help="a point needing more extra memory is skipped (default: 8)")
    cost.add_argument("--max-forward-seconds", type=float, default=60.0,
                      help="a point whose forward takes longer is not timed (default: 60)")
    cost.add_argument("--cost-model-kwargs", type=_mapping, metavar="YAML",
                      help="more arguments of every type's cost model, e.g. '{region_sizes: [8, 4, 2, null]}' "
                           "(BRA with regions of fixed size; the types without regions ignore it)")
    training = parser.add_argument_group("training budget")
    training.add_argument("--epochs", type=int,
                          help="epochs per run (default: 2; with --budget-minutes an upper bound, default 100)")
    training.add_argument("--budget-minutes", type=float,
                          help="instead of a fixed number of epochs: this many minutes of wall clock per run "
                               "(the schedule runs over the budget; the load of the machine decides the steps)")
    training.add_argument("--train-batch-size", type=int,
                          help="images per step (default: the engine's, 128 classification / 8 segmentation)")
    training.add_argument("--data-dir", help="Fashion-MNIST's four idx files, for both tasks (default: where "
                                             "`biformer train` finds them)")
    training.add_argument("--train-samples", type=int, default=10000,
                          help="classification: the first N Fashion-MNIST training images (default: 10000)")
    training.add_argument("--input-size", type=int, default=32, help="classification image side (default: 32)")
    training.add_argument("--model-kwargs", type=_mapping, metavar="YAML",
                          help="classification model arguments, e.g. '{n_win: 2, topks: [1, 4, 4, -2]}' (default: "
                               "`biformer train`'s, 2 regions per side for 32 px)")
    training.add_argument("--train-scenes", type=int, default=1000, help="segmentation scenes (default: 1000)")
    training.add_argument("--val-scenes", type=int, default=200, help="segmentation evaluation scenes (default: 200)")
    training.add_argument("--scene-size", type=int, default=128, help="segmentation scene side (default: 128)")
    parser.set_defaults(run=run)
    return parser


def options_from(args: argparse.Namespace) -> object:
    """The :class:`~biformer.comparison.CompareOptions` of the parsed flags (not yet checked)."""
    from ..comparison import CompareOptions

    flat = lambda lists: [name for names in lists for name in names]  # noqa: E731
    values = dict(
        output=args.output or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}", threads=args.threads, seeds=args.seeds,
        sizes=args.sizes, batch_size=args.batch_size, repeats=args.repeats, memory_limit_gib=args.memory_limit_gib,
        max_forward_s=args.max_forward_seconds, budget_minutes=args.budget_minutes,
        train_samples=args.train_samples, input_size=args.input_size, train_scenes=args.train_scenes,
        val_scenes=args.val_scenes, train_batch_size=args.train_batch_size, data_dir=args.data_dir,
        scene_size=args.scene_size, model_kwargs=args.model_kwargs, cost_model_kwargs=args.cost_model_kwargs,
    )
    if args.epochs is not None or args.budget_minutes is not None:
        values["epochs"] = args.epochs if args.epochs is not None else BUDGET_EPOCHS_BOUND
    if args.attn_types:
        values["attn_types"] = flat(args.attn_types)
    if args.tasks:
        values["tasks"] = flat(args.tasks)
    if args.model:
        values.update(cost_model=args.model, train_model=args.model)
    return CompareOptions(**values)


def run(args: argparse.Namespace) -> int:
    from ..comparison import ComparisonError, check_options, run_comparison
    from ..train import ConfigError
    from ..train.data import DataError
    from .common import report_error

    try:
        options = options_from(args)
        check_options(options)
        command = shlex.join(["biformer", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else None
        result = run_comparison(options, command=command)
    except (ComparisonError, ConfigError, DataError, OSError) as error:
        return report_error("compare", error)
    print(result["table"])
    print(f"results: {options.output}/ (results.json, results.csv, table.md, plots)")
    sys.stdout.flush()
    return 0
