"""The training configuration: the shared options, filled from defaults, then a YAML file, then flags.

:class:`TrainConfig` holds the options every task reads (model, data folder, optimisation, run); each task's own
options (classification's augmentation, the dense tasks' architecture ...) are a small dataclass that the task
declares (:class:`~biformer.train.options.TaskOptions`), held in ``TrainConfig.options``. The task registry
(:mod:`biformer.train.registry`) merges them: every option is a command-line flag (``lr_base`` ->
``--lr-base``; the field's ``help`` metadata is the flag's help text) and a key of the same flat YAML
mapping. The defaults are the quick start's: ``biformer train`` with no arguments trains ``biformer_nano`` on
Fashion-MNIST. The resolved configuration (shared options, then the task's) is written to ``config.yaml`` in
the run folder, and ``--resume RUN`` reads it back.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from ..files import atomic_write  # raises WriteError naming the file when it cannot be written
from .errors import ConfigError
from .options import TaskOptions, check_counts, field_default
from .options import option as _option
from .registry import check_task_options, option_owners, task_defaults, task_option_fields, task_options_class

__all__ = ["PRECISIONS", "ConfigError", "TrainConfig", "load_config", "load_yaml", "save_config"]

PRECISIONS = ("fp32", "bf16", "fp16")


def _yaml() -> Any:
    """PyYAML, imported on first use (the ``cli`` extra)."""
    return require("yaml", extra="cli", purpose="reading and writing YAML configurations")


@dataclass
class TrainConfig:
    """Everything a training run depends on. See docs/training.md."""

    # --- what to train ------------------------------------------------------------------------
    task: str = _option(
        "classification", "what to train: classification, segmentation or detection (the Task registered under this "
        "name; segmentation and detection have their own defaults, see docs/dense.md)"
    )
    model: str = _option("biformer_nano", "timm model name (biformer_nano, biformer_tiny, ...)")
    model_kwargs: dict = _option(
        {"n_win": 2, "topks": [2, 2, 4, -2]},
        "extra keyword arguments of the model, as YAML/JSON (default: 2 regions per side for 32 px images)",
    )
    pretrained: str | None = _option(
        None, "fine-tune from this weights file (ours .safetensors or the authors' .pth); a new head is made "
        "when the class count differs"
    )
    # --- data ---------------------------------------------------------------------------------
    dataset: str = _option(
        "fashion-mnist", "fashion-mnist, imagefolder (DIR/train, DIR/val) or csv (DIR/train.csv); segmentation and "
        "detection: scenes (their default), maskfolder or coco"
    )
    data_dir: str | None = _option(None, "dataset folder (fashion-mnist: searched in the usual places if unset)")
    train_split: str = _option("train", "training split: sub-folder (imagefolder) or CSV name without .csv")
    val_split: str = _option("val", "evaluation split (fashion-mnist: always its 10k test set)")
    input_size: int | None = _option(32, "image side in pixels (None: the model's default)")
    workers: int = _option(1, "data-loading worker processes per rank (0: load in the training process)")
    bad_images: str = _option(
        "skip", "unreadable or corrupted images: skip (replace by the next readable one, count, report) or fail "
        "(stop at the first, naming the file)"
    )
    max_bad_images: float = _option(
        0.01, "skip: stop when more than this fraction of a split's images is unreadable (0: stop at the first)"
    )
    # --- optimisation -----------------------------------------------------------------------------
    epochs: int = _option(8, "training epochs")
    batch_size: int = _option(128, "images per step per process")
    accum_steps: int = _option(1, "gradient accumulation: micro-batches per optimizer step")
    opt: str = _option("adamw", "timm optimizer name")
    lr: float | None = _option(None, "learning rate (None: lr_base * global batch / lr_base_size)")
    lr_base: float = _option(8e-3, "learning rate for a global batch of lr_base_size images")
    lr_base_size: int = _option(512, "global batch size lr_base refers to")
    weight_decay: float = _option(0.05, "AdamW weight decay (not applied to biases, norms, no_weight_decay())")
    sched: str = _option("cosine", "timm learning-rate schedule (cosine, multistep, poly, step, ...)")
    decay_milestones: list | None = _option(
        None, "multistep: epochs at which the rate is multiplied by decay_rate (None: timm's 90, 180, 270)"
    )
    decay_rate: float = _option(0.1, "step/multistep: rate multiplier at each decay; poly: the power")
    warmup_epochs: float = _option(0.5, "linear warm-up length in epochs")
    warmup_lr: float = _option(1e-5, "learning rate at the start of warm-up")
    min_lr: float = _option(1e-5, "final learning rate of the schedule")
    clip_grad: float | None = _option(None, "clip the gradient norm to this value (None: off)")
    drop_path: float = _option(0.0, "stochastic depth rate")
    model_ema: bool = _option(False, "keep an exponential moving average of the weights and evaluate it")
    model_ema_decay: float = _option(0.999, "EMA decay per optimizer step")
    precision: str = _option(
        "fp32", "fp32, bf16 (bf16 autocast) or fp16 (fp16 autocast with a gradient scaler: steps with non-finite "
        "gradients are skipped and counted; for GPUs without fast bf16)"
    )
    grad_checkpointing: bool = _option(False, "re-compute activations in backward to save memory")
    # --- run --------------------------------------------------------------------------------------
    seed: int = _option(0, "random seed (data order, augmentation, initialisation)")
    device: str | None = _option(None, "cpu, cuda, cuda:1 ... (None: cuda when available)")
    threads: int | None = _option(
        1, "torch CPU threads per process (None: torch's default, one per core; docs/training.md: shared machines)"
    )
    output: str = _option("runs", "folder holding the run folders")
    name: str | None = _option(None, "run folder name (None: DATASET-MODEL-TIMESTAMP)")
    eval_every: int = _option(1, "evaluate every this many epochs (and after the last)")
    time_limit: float | None = _option(
        None, "minutes of training (wall clock, evaluations included): the learning-rate schedule runs over this "
        "budget and training stops when it is spent (final evaluation and checkpoint); None: no limit"
    )
    progress: bool = _option(True, "show progress bars")
    # --- scale: recovery checkpoints, data pipeline, logs, several processes (biformer.train.recovery) ----
    checkpoint_every: int | None = _option(
        None, "also save a recovery checkpoint every this many optimizer steps inside an epoch (None: by time, "
        "see checkpoint_minutes)"
    )
    checkpoint_minutes: float | None = _option(
        10.0, "with checkpoint_every None: save a recovery checkpoint inside an epoch when this many minutes "
        "passed since the last checkpoint (None: only at the end of epochs)"
    )
    keep_checkpoints: int = _option(2, "recovery checkpoints kept (older ones removed once a newer is complete)")
    repeated_aug: int = _option(
        1, "repeated augmentation: each image appears this many times per epoch, differently augmented, on "
        "different processes (the authors' recipe: 3); the epoch keeps len(dataset) images"
    )
    pin_memory: bool = _option(True, "page-locked loader memory when training on CUDA (never on CPU: no use there)")
    persistent_workers: bool = _option(True, "keep data-loading workers alive between epochs")
    prefetch_factor: int | None = _option(None, "batches each worker loads ahead (None: torch's default, 2)")
    sync_bn: bool = _option(
        False, "several processes on CUDA: synchronise BatchNorm statistics across processes (SyncBatchNorm)"
    )
    tensorboard: bool = _option(True, "write TensorBoard event files to RUN/tensorboard")
    wandb: bool = _option(False, "also log to Weights & Biases in offline mode (RUN/wandb; needs wandb installed)")
    log_every: int = _option(20, "log loss, learning rate and throughput every this many optimizer steps")

    # --- the chosen task's own options (see biformer.train.options) --------------------------------
    options: TaskOptions | None = field(default=None, metadata=dict(task_options=True))

    def __post_init__(self) -> None:
        """``options`` None or a mapping: the task's options dataclass (its defaults, or these values)."""
        if self.options is None or isinstance(self.options, dict):
            try:
                options_class = task_options_class(self.task)
            except ConfigError:
                return  # an unknown task is reported when it is built (or by load_config)
            self.options = options_class(**(self.options or {}))

    def __getattr__(self, name: str) -> Any:
        """``config.mixup`` for ``config.options.mixup``: the chosen task's options read as before."""
        options = self.__dict__.get("options")
        if not name.startswith("_") and options is not None and name in _names(type(options)):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} (not an option of task "
                             f"{self.__dict__.get('task')!r})")

    def to_dict(self) -> dict[str, Any]:
        """The options as one flat mapping: the shared ones, then the task's (the layout of ``config.yaml``)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in shared_fields()}
        if self.options is not None:
            values.update(self.options.to_dict())
        return values


def _names(options_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(options_class))


def shared_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` that are options (every task reads them), in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("task_options")]


def _field_types() -> dict[str, dataclasses.Field]:
    """Every option by name: the shared ones, then each task's own (built-in tasks imported)."""
    fields = {f.name: f for f in shared_fields()}
    for name, option_field in task_option_fields().items():
        fields.setdefault(name, option_field)
    return fields


def _expected_kind(config_field: dataclasses.Field) -> tuple[type, ...]:
    """Python types a value of this field may have (``int`` is accepted where a float is expected)."""
    annotation = str(config_field.type)
    kinds: tuple[type, ...] = ()
    for name, kind in (("bool", bool), ("int", int), ("float", (float, int)), ("str", str), ("list", list),
                       ("dict", dict)):
        if name in annotation:
            kinds += kind if isinstance(kind, tuple) else (kind,)
    return kinds


def check_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check names and types of configuration ``values`` read from ``source`` (a file or "flags")."""
    fields = _field_types()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}; known options: {sorted(fields)}")
    for name, value in values.items():
        config_field = fields[name]
        if value is None:
            if "None" not in str(config_field.type):
                raise ConfigError(f"{source}: option {name!r} cannot be empty (null)")
            continue
        kinds = _expected_kind(config_field)
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            raise ConfigError(
                f"{source}: option {name!r} expects {config_field.type}, got {value!r} ({type(value).__name__})"
            )
    return values


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of options; clear errors for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    yaml = _yaml()
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML ({error})") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option: value, got {type(values).__name__}")
    return check_values({str(key).replace("-", "_"): value for key, value in values.items()}, str(path))


def load_config(*layers: tuple[dict[str, Any], str]) -> TrainConfig:
    """Defaults, overridden by each ``(values, source)`` layer in turn (e.g. the YAML file, then flags).

    The defaults are TrainConfig's, with the chosen task's ``defaults`` over them (e.g. ``dataset: scenes``
    for segmentation and detection), and its options dataclass's. The layers are flat mappings of shared and
    task options alike; an option of another task is refused, unless it holds its default value (an older
    run's ``config.yaml`` listed every option of every task): then it is left out.

    Raises:
        ConfigError: naming the option (an unknown one, a wrong type, another task's, a value out of range).
    """
    merged: dict[str, Any] = {}
    for values, source in layers:
        merged.update(check_values(values, source))
    task = merged.get("task", TrainConfig.task)
    options_class = task_options_class(task)  # ConfigError for an unknown task
    check_task_options(task, merged)
    merged = {**task_defaults(task), **merged}  # the task's defaults, beneath
    shared = {f.name for f in shared_fields()}
    own = _names(options_class)
    config = TrainConfig(**{name: value for name, value in merged.items() if name in shared},
                         options=options_class(**{name: value for name, value in merged.items() if name in own}))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field and range checks; raises :class:`ConfigError` naming the option."""
    check_counts(config, ("epochs", "batch_size", "accum_steps", "lr_base_size", "eval_every"),
                 ("input_size", "threads"))
    if config.workers < 0:
        raise ConfigError(f"option 'workers': expected an integer >= 0, got {config.workers}")
    if config.bad_images not in ("skip", "fail"):
        raise ConfigError(f"option 'bad_images': expected 'skip' or 'fail', got {config.bad_images!r}")
    if not 0.0 <= config.max_bad_images <= 1.0:
        raise ConfigError(f"option 'max_bad_images': expected a fraction in [0, 1], got {config.max_bad_images}")
    _check_run_name(config.name)
    if not 0.0 <= config.drop_path < 1.0:
        raise ConfigError(f"option 'drop_path': expected a value in [0, 1), got {config.drop_path}")
    if not 0.0 < config.model_ema_decay < 1.0:
        raise ConfigError(f"option 'model_ema_decay': expected a value in (0, 1), got {config.model_ema_decay}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"option 'precision': expected one of {PRECISIONS}, got {config.precision!r}")
    _check_numbers(config)
    for name in ("lr", "clip_grad", "time_limit"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"option {name!r}: expected None or a positive number, got {value}")
    if config.options is not None:
        config.options.validate(config)  # the task's own options
    _validate_scale_options(config)


def _validate_scale_options(config: TrainConfig) -> None:
    """Checks of the recovery-checkpoint, data-pipeline, logging and schedule options."""
    check_counts(config, ("keep_checkpoints", "repeated_aug", "log_every"), ("checkpoint_every", "prefetch_factor"))
    if config.checkpoint_minutes is not None and config.checkpoint_minutes <= 0:
        raise ConfigError(f"option 'checkpoint_minutes': expected None or a positive number of minutes, got "
                          f"{config.checkpoint_minutes}")
    if config.prefetch_factor is not None and config.workers == 0:
        raise ConfigError(f"option 'prefetch_factor': needs workers >= 1 (batches are loaded ahead by worker "
                          f"processes), got workers 0 and prefetch_factor {config.prefetch_factor}")
    milestones = config.decay_milestones
    if milestones is not None and (not milestones or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones)
            or list(milestones) != sorted(milestones)):
        raise ConfigError(f"option 'decay_milestones': expected None or increasing epochs >= 1, got {milestones}")
    if config.decay_rate <= 0:
        raise ConfigError(f"option 'decay_rate': expected a positive number, got {config.decay_rate}")


# Bounds of the options a number can make nonsensical (a negative decay, a NaN rate), checked before any data.
_LOWER_BOUNDS = {"lr_base": (0.0, False), "weight_decay": (0.0, True), "warmup_epochs": (0.0, True),
                 "warmup_lr": (0.0, True), "min_lr": (0.0, True), "seed": (0, True)}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(config: TrainConfig) -> None:
    """Finite numbers (the task's options too), lower bounds, the device, the model's keyword arguments
    (architecture arguments only); ConfigError naming the option."""
    for name, value in config.to_dict().items():
        if isinstance(value, float) and not _finite(value):
            raise ConfigError(f"option {name!r}: expected a finite number, got {value}")
    for name, (low, inclusive) in _LOWER_BOUNDS.items():
        value = getattr(config, name)
        if value is not None and (value < low or (value == low and not inclusive)):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"option {name!r}: expected a number {relation} {low:g}, got {value}")
    if config.device is not None:
        import torch

        try:
            torch.device(config.device)
        except RuntimeError as error:
            raise ConfigError(f"option 'device': expected cpu, cuda, cuda:N ..., got {config.device!r}") from error
    import timm

    from ..model_files import check_model_kwargs

    if config.task == "classification" and not timm.is_model(config.model):
        raise ConfigError(f"option 'model': unknown timm model {config.model!r}; BiFormer models: "
                          f"{timm.list_models('biformer*')}")
    try:
        check_model_kwargs(config.model, config.model_kwargs, "option 'model_kwargs'",
                           dense=config.task != "classification")
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _check_run_name(name: str | None) -> None:
    """A run name is one folder name inside ``output``: no separators, no ``..``, not absolute."""
    if name is None:
        return
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if name in ("", ".", "..") or any(separator in name for separator in separators) or "\0" in name:
        raise ConfigError(
            f"option 'name': expected a single folder name inside 'output' (no '/', no '..', not absolute), "
            f"got {name!r}"
        )
    if len(name.encode()) > 255:
        raise ConfigError(f"option 'name': expected a folder name of at most 255 bytes, got {len(name.encode())}")


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML (atomically: temporary file, then rename)."""
    text = _yaml().safe_dump(config.to_dict(), sort_keys=False)
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def config_fields() -> list[dataclasses.Field]:
    """Every option, one command-line flag and YAML key each: the shared fields of :class:`TrainConfig` in
    declaration order, then each task's own options (an option several tasks own once)."""
    return list(_field_types().values())


def option_default(option_field: dataclasses.Field) -> Any:
    """The default of an option (shared: TrainConfig's; a task's: its options dataclass's)."""
    return field_default(option_field)


def option_tasks(name: str) -> list[str]:
    """The tasks that own option ``name`` (empty for a shared option, which every task reads)."""
    return option_owners().get(name, [])


def is_flag_switch(config_field: dataclasses.Field) -> bool:
    """Whether the field is a plain boolean (a ``--name/--no-name`` switch on the command line)."""
    return str(config_field.type) == "bool"


def parse_flag_value(config_field: dataclasses.Field, text: str) -> Any:
    """Convert a flag's text to the field's type: numbers, ``none``/``null`` for optional fields, YAML for
    lists and mappings (``--model-kwargs '{n_win: 4}'``, ``--scale '[0.5, 1]'``)."""
    kinds = _expected_kind(config_field)
    flag = "--" + config_field.name.replace("_", "-")
    if text.strip().lower() in ("none", "null") and "None" in str(config_field.type):
        return None
    yaml = _yaml() if list in kinds or dict in kinds else None
    yaml_error = yaml.YAMLError if yaml is not None else ValueError
    try:
        if yaml is not None:
            value = yaml.safe_load(text)
        elif int in kinds and float not in kinds:
            value = int(text)
        elif float in kinds:
            value = float(text)
        else:
            value = text
    except (ValueError, yaml_error) as error:
        raise ConfigError(f"{flag}: expected {config_field.type}, got {text!r}") from error
    if not isinstance(value, kinds):
        raise ConfigError(f"{flag}: expected {config_field.type}, got {text!r}")
    return value
