"""Attention types compared side by side: same backbone, same recipe, only the token mixer changes.

``biformer compare`` (:mod:`biformer.cli.compare`) runs :func:`run_comparison`:

- ``cost`` (:mod:`.cost`): FLOPs, parameters, images/s and peak memory of each type per image size;
- ``classification`` and ``segmentation`` (:mod:`.accuracy`): the final evaluation after the same fixed
  training budget (epochs over a fixed training set) per type and seed, mean ± std over seeds;

and writes ``results.json``, ``results.csv``, ``table.md``, ``cost.png`` and ``accuracy.png`` into the run
folder (:mod:`.report`), rewritten after every measurement so an interrupted comparison keeps what it measured.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .accuracy import (
    TrainingResult,
    check_trainable,
    classification_config,
    fashion_mnist_subset,
    segmentation_config,
    train,
)
from .cost import CostPoint, measure_cost
from .report import write_outputs

__all__ = ["TASKS", "CompareOptions", "ComparisonError", "CostPoint", "TrainingResult", "check_options",
           "run_comparison"]

TASKS = ("cost", "classification", "segmentation")
MIN_SIZE = 32  # px: the four stages of a BiFormer need at least one token at stride 32


class ComparisonError(ValueError):
    """An option of the comparison that cannot be used; the message names it (as the command-line flag)."""


@dataclass
class CompareOptions:
    """What :func:`run_comparison` measures; the defaults are the measured comparison of docs/comparison.md."""

    output: str
    attn_types: list[str] = field(default_factory=lambda: list(_attention_types()))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # cost
    cost_model: str = "biformer_tiny"
    sizes: list[int] = field(default_factory=lambda: [224, 512, 1024])
    batch_size: int = 1
    repeats: int = 3
    memory_limit_gib: float = 8.0
    cost_model_kwargs: dict[str, Any] | None = None  # more arguments of every type's cost model (region_sizes ...)
    max_forward_s: float = 60.0
    # training (both tasks)
    train_model: str = "biformer_nano"
    epochs: int = 2
    train_batch_size: int | None = None  # None: the engine's (128 for classification, 8 for segmentation)
    data_dir: str | None = None  # Fashion-MNIST's idx files (None: where ``biformer train`` finds them)
    budget_minutes: float | None = None  # wall clock per run; then ``epochs`` is an upper bound
    # classification
    train_samples: int = 10000
    input_size: int = 32
    model_kwargs: dict[str, Any] | None = None  # classification model arguments (None: the engine's, for 32 px)
    # segmentation (Semantic FPN; backbone: a preset of biformer.dense.engine_tasks or a BiFormer name)
    segmentation_model: str = "shallow"
    # 16-channel heads (the preset has 32): stage 1 then has 2 heads, which axial attention needs (half per axis)
    segmentation_kwargs: dict[str, Any] = field(default_factory=lambda: {"head_dim": 16})
    train_scenes: int = 1000
    val_scenes: int = 200
    scene_size: int = 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_list(option: str, values: list, known: tuple | None = None) -> None:
    if not values:
        raise ComparisonError(f"{option}: expected at least one value, got none")
    if known is not None:
        unknown = [value for value in values if value not in known]
        if unknown:
            raise ComparisonError(f"{option}: unknown {unknown}; expected some of {', '.join(known)}")
    if len(set(values)) != len(values):
        raise ComparisonError(f"{option}: expected each value once, got {values}")


def _check_at_least(option: str, value: float, low: float, kind: str = "an integer") -> None:
    if value < low:
        raise ComparisonError(f"{option}: expected {kind} >= {low:g}, got {value:g}")


def check_options(options: CompareOptions) -> None:
    """Check every option before anything runs; raises :class:`ComparisonError` naming the flag."""
    _check_list("--attn-types", options.attn_types, _attention_types())
    _check_list("--tasks", options.tasks, TASKS)
    _check_list("--seeds", options.seeds)
    _check_list("--sizes", options.sizes)
    for size in options.sizes:
        _check_at_least("--sizes", size, MIN_SIZE, "image sides in pixels")
    for option, value in (("--threads", options.threads), ("--batch-size", options.batch_size),
                          ("--repeats", options.repeats), ("--epochs", options.epochs),
                          ("--train-samples", options.train_samples), ("--train-scenes", options.train_scenes),
                          ("--val-scenes", options.val_scenes), ("--train-batch-size", options.train_batch_size)):
        if value is not None:
            _check_at_least(option, value, 1)
    _check_at_least("--input-size", options.input_size, MIN_SIZE, "an image side in pixels")
    _check_at_least("--scene-size", options.scene_size, MIN_SIZE, "an image side in pixels")
    for option, value in (("--budget-minutes", options.budget_minutes), ("--memory-limit-gib",
                          options.memory_limit_gib), ("--max-forward-seconds", options.max_forward_s)):
        if value is not None and not value > 0:
            raise ComparisonError(f"{option}: expected a positive number, got {value:g}")
    if options.model_kwargs is not None and "classification" not in options.tasks:
        raise ComparisonError(f"--model-kwargs: sets the classification model only, and --tasks is "
                              f"{','.join(options.tasks)}; for the cost models use --cost-model-kwargs")
    if options.cost_model_kwargs is not None and "cost" not in options.tasks:
        raise ComparisonError(f"--cost-model-kwargs: sets the cost models only, and --tasks is "
                              f"{','.join(options.tasks)}")
    _check_models(options)
    _check_output(Path(options.output))


def _check_models(options: CompareOptions) -> None:
    """--model is a timm model and --model-kwargs / --cost-model-kwargs hold its architecture arguments only,
    for the tasks that run, before anything is read."""
    import timm

    import biformer  # noqa: F401  (registers the models with timm)

    from ..model_files import check_model_kwargs

    checks = []
    if "cost" in options.tasks:
        checks.append(("--cost-model-kwargs", options.cost_model, options.cost_model_kwargs))
    if "classification" in options.tasks:
        checks.append(("--model-kwargs", options.train_model, options.model_kwargs))
    for option, name, kwargs in checks:
        if name is not None and not timm.is_model(name):
            raise ComparisonError(f"--model: unknown timm model {name!r}; BiFormer models: "
                                  f"{timm.list_models('biformer*')}")
        if kwargs is not None:
            try:
                check_model_kwargs(name, kwargs, option)
            except ValueError as error:
                raise ComparisonError(str(error)) from error


def _check_output(run_dir: Path) -> None:
    """The run folder can be created and written, and holds no earlier comparison (never overwritten)."""
    if (run_dir / "results.json").exists():
        raise ComparisonError(f"--output: {run_dir} already holds a comparison (results.json); choose another folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ComparisonError(f"--output: cannot write to {run_dir} ({error.strerror or error})") from error


def _attention_types() -> tuple[str, ...]:
    from ..layers import ATTENTION_TYPES

    return tuple(ATTENTION_TYPES)


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run_comparison(
    options: CompareOptions, log: Callable[[str], None] = print, command: str | None = None
) -> dict[str, Any]:
    """Measure what ``options`` asks and write the outputs into ``options.output`` (created); returns
    ``{"cost": [CostPoint], "runs": [TrainingResult], "table": markdown}``. ``command``: the command line,
    recorded in results.json."""
    run_dir = Path(options.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = dict(
        command=command, options=options.to_dict(), python=platform.python_version(), machine=platform.machine(),
        cpu_count=os.cpu_count(), load_average_start=_load_average(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    import torch

    header["torch"] = torch.__version__
    points: list[CostPoint] = []
    runs: list[TrainingResult] = []
    cost_kwargs = f" {options.cost_model_kwargs}" if options.cost_model_kwargs else ""
    titles = dict(cost_title=f"{options.cost_model}{cost_kwargs}, inference, fp32, batch {options.batch_size}, "
                             f"{options.threads} thread(s); median of {options.repeats} interleaved calls",
                  accuracy_title=_accuracy_title(options))

    def save() -> str:
        header["load_average_now"] = _load_average()
        return write_outputs(run_dir, points, runs, header, **titles)

    plan = _training_plan(options, run_dir)  # checks every (task, type) before anything is measured
    if "cost" in options.tasks:
        log(f"cost: {options.cost_model} at {options.sizes} px, load average {_load_average()}")
        points.extend(measure_cost(
            options.attn_types, options.sizes, options.cost_model, batch_size=options.batch_size,
            repeats=options.repeats, threads=options.threads, memory_limit_gib=options.memory_limit_gib,
            max_forward_s=options.max_forward_s, log=log,
            model_kwargs={name: dict(options.cost_model_kwargs or {}) for name in options.attn_types},
        ))
        save()
    for values, run_name in plan:
        runs.append(train(values, run_dir / "runs" / run_name))
        log(_describe(runs[-1]))
        save()
    header["load_average_end"] = _load_average()
    table = save()
    return dict(cost=points, runs=runs, table=table)


def _training_plan(options: CompareOptions, run_dir: Path) -> list[tuple[dict[str, Any], str]]:
    """(configuration values, run folder name) of every training run, seeds outermost so that the types
    of one seed run close together in time. Every (task, type) is checked first (:func:`check_trainable`).

    Raises:
        ComparisonError: a type cannot be built or run with the configuration (names the type and the task).
    """
    budget: dict[str, Any] = dict(epochs=options.epochs, time_limit=options.budget_minutes, threads=options.threads)
    if options.train_batch_size is not None:
        budget["batch_size"] = options.train_batch_size
    makers: dict[str, Callable[[str, int], dict[str, Any]]] = {}
    data_dir = run_dir / "data" / "fashion-mnist"  # the training subset, written once every run is checked
    if "classification" in options.tasks:
        makers["classification"] = lambda attn_type, seed: classification_config(
            attn_type, seed, data_dir, model=options.train_model, model_kwargs=options.model_kwargs,
            input_size=options.input_size, **budget)
    if "segmentation" in options.tasks:
        makers["segmentation"] = lambda attn_type, seed: segmentation_config(
            attn_type, seed, model=options.segmentation_model, model_kwargs=options.segmentation_kwargs,
            data_dir=options.data_dir, train_scenes=options.train_scenes, val_scenes=options.val_scenes,
            input_size=options.scene_size, **budget)
    for task, make in makers.items():
        for attn_type in options.attn_types:
            try:
                check_trainable(make(attn_type, options.seeds[0]))
            except (ValueError, RuntimeError) as error:  # ConfigError is a ValueError
                raise ComparisonError(f"--attn-types: {attn_type!r} cannot be trained for {task}: {error}") from error
    if "classification" in options.tasks:  # the data is read only now, after the options and the models
        fashion_mnist_subset(data_dir, options.train_samples, options.data_dir)
    elif "segmentation" in options.tasks:  # the scenes are composed later: find their crops before measuring
        from ..dense.scenes import FASHION_MNIST_ENV
        from ..train.data import find_fashion_mnist

        find_fashion_mnist(options.data_dir or os.environ.get(FASHION_MNIST_ENV), download=False)
    return [(make(attn_type, seed), f"{task}-{attn_type}-seed{seed}")
            for task, make in makers.items() for seed in options.seeds for attn_type in options.attn_types]


def _accuracy_title(options: CompareOptions) -> str:
    """What the training runs were: per task, the model and data; then the budget, seeds and threads."""
    parts = []
    if "classification" in options.tasks:
        kwargs = f" {options.model_kwargs}" if options.model_kwargs else ""
        parts.append(f"classification: {options.train_model}{kwargs}, {options.input_size} px, "
                     f"{options.train_samples} training images")
    if "segmentation" in options.tasks:
        parts.append(f"segmentation: Semantic FPN on '{options.segmentation_model}' {options.segmentation_kwargs}, "
                     f"{options.scene_size} px, {options.train_scenes} scenes")
    budget = (f"{options.budget_minutes:g} min per run (at most {options.epochs} epochs)" if options.budget_minutes
              else f"{options.epochs} epoch(s)")
    return "; ".join([*parts, f"{budget}, seeds {options.seeds}, {options.threads} thread(s)"])


def _describe(result: TrainingResult) -> str:
    return (f"  {result.task} {result.attn_type} seed {result.seed}: {result.metric} {result.value:.4g} "
            f"({result.steps} steps, {result.seconds:.0f} s)")
