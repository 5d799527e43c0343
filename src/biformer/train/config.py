"""The training configuration: one flat dataclass, filled from defaults, then a YAML file, then flags.

Every field is also a command-line flag (``lr_base`` -> ``--lr-base``); the field's ``help`` metadata is the
flag's help text. The defaults are the quick start's: ``biformer train`` with no arguments trains
``biformer_nano`` on Fashion-MNIST. The resolved configuration is written to ``config.yaml`` in the run
folder, and ``--resume RUN`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from ..files import atomic_write  # raises WriteError naming the file when it cannot be written

__all__ = ["PRECISIONS", "ConfigError", "TrainConfig", "load_config", "load_yaml", "save_config"]

PRECISIONS = ("fp32", "bf16", "fp16")


def _yaml() -> Any:
    """PyYAML, imported on first use (the ``cli`` extra)."""
    return require("yaml", extra="cli", purpose="reading and writing YAML configurations")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the option."""


def _option(default: Any, help_text: str) -> Any:
    """A dataclass field with its command-line help; lists and dicts get a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=dict(help=help_text))
    return field(default=default, metadata=dict(help=help_text))


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
    download: bool = _option(True, "fashion-mnist: download with torchvision when it is not installed")
    input_size: int | None = _option(32, "image side in pixels (None: the model's default)")
    in_chans: int | None = _option(None, "image channels (None: 1 for fashion-mnist, else 3)")
    mean: list | None = _option(None, "per-channel normalisation mean (None: the dataset's or ImageNet's)")
    std: list | None = _option(None, "per-channel normalisation std (None: the dataset's or ImageNet's)")
    interpolation: str = _option("bilinear", "resize interpolation (bilinear, bicubic)")
    crop_pct: float = _option(1.0, "evaluation: resize to input_size / crop_pct, then centre crop")
    workers: int = _option(1, "data-loading worker processes per rank (0: load in the training process)")
    bad_images: str = _option(
        "skip", "unreadable or corrupted images: skip (replace by the next readable one, count, report) or fail "
        "(stop at the first, naming the file)"
    )
    max_bad_images: float = _option(
        0.01, "skip: stop when more than this fraction of a split's images is unreadable (0: stop at the first)"
    )
    # --- augmentation (timm) --------------------------------------------------------------------
    scale: list = _option([0.75, 1.0], "random-resized-crop area range")
    hflip: float = _option(0.5, "horizontal flip probability")
    color_jitter: float | None = _option(None, "colour jitter strength (None: off)")
    auto_augment: str | None = _option(
        None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1-mmax9 (RandAugment); None: off"
    )
    reprob: float = _option(0.0, "random erasing probability")
    mixup: float = _option(0.0, "mixup alpha (0: off)")
    cutmix: float = _option(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = _option(1.0, "probability of applying mixup or cutmix to a batch")
    smoothing: float = _option(0.1, "label smoothing")
    # --- detection and segmentation (--task segmentation | detection; see biformer.dense.engine_tasks) ----
    architecture: str | None = _option(
        None, "segmentation: semantic_fpn or upernet; detection: maskrcnn or retinanet (None: semantic_fpn / "
        "maskrcnn)"
    )
    train_scenes: int = _option(4000, "dataset scenes: training scenes (from Fashion-MNIST's training crops)")
    val_scenes: int = _option(500, "dataset scenes: evaluation scenes (from Fashion-MNIST's test crops)")
    num_classes: int | None = _option(
        None, "dataset maskfolder: classes in the masks, background included (ids 0..num_classes-1, 255 ignored)"
    )
    head_channels: int | None = _option(
        None, "width of the segmentation head / the detection FPN (None: 64, the CPU recipe)"
    )
    aux_head: bool = _option(True, "upernet: the auxiliary FCN head on stage 3 (loss weight 0.4, training only)")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


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
    for segmentation and detection)."""
    merged: dict[str, Any] = {}
    for values, source in layers:
        merged.update(check_values(values, source))
    from .task import check_task_options, task_defaults  # here: the task module imports this one

    task = merged.get("task", TrainConfig.task)
    check_task_options(task, merged)
    merged = {**task_defaults(task), **merged}  # the task's defaults, beneath
    config = TrainConfig(**merged)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field and range checks; raises :class:`ConfigError` naming the option."""
    positive = ("epochs", "batch_size", "accum_steps", "lr_base_size", "eval_every", "train_scenes", "val_scenes")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"option {name!r}: expected an integer >= 1, got {getattr(config, name)}")
    for name in ("input_size", "in_chans", "threads", "num_classes", "head_channels"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"option {name!r}: expected None or an integer >= 1, got {value}")
    if config.workers < 0:
        raise ConfigError(f"option 'workers': expected an integer >= 0, got {config.workers}")
    if config.bad_images not in ("skip", "fail"):
        raise ConfigError(f"option 'bad_images': expected 'skip' or 'fail', got {config.bad_images!r}")
    if not 0.0 <= config.max_bad_images <= 1.0:
        raise ConfigError(f"option 'max_bad_images': expected a fraction in [0, 1], got {config.max_bad_images}")
    _check_run_name(config.name)
    for name in ("hflip", "reprob", "mixup_prob"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"option {name!r}: expected a probability in [0, 1], got {getattr(config, name)}")
    if not 0.0 <= config.smoothing < 1.0:
        raise ConfigError(f"option 'smoothing': expected a value in [0, 1), got {config.smoothing}")
    if not 0.0 <= config.drop_path < 1.0:
        raise ConfigError(f"option 'drop_path': expected a value in [0, 1), got {config.drop_path}")
    if not 0.0 < config.model_ema_decay < 1.0:
        raise ConfigError(f"option 'model_ema_decay': expected a value in (0, 1), got {config.model_ema_decay}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"option 'precision': expected one of {PRECISIONS}, got {config.precision!r}")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise ConfigError(f"option 'batch_size': mixup/cutmix need an even batch size, got {config.batch_size}")
    _check_numbers(config)
    if len(config.scale) != 2 or not 0 < config.scale[0] <= config.scale[1] <= 1:
        raise ConfigError(f"option 'scale': expected [min, max] with 0 < min <= max <= 1, got {config.scale}")
    for name in ("lr", "clip_grad", "time_limit"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"option {name!r}: expected None or a positive number, got {value}")
    _validate_scale_options(config)


def _validate_scale_options(config: TrainConfig) -> None:
    """Checks of the recovery-checkpoint, data-pipeline, logging and schedule options."""
    for name in ("keep_checkpoints", "repeated_aug", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"option {name!r}: expected an integer >= 1, got {getattr(config, name)}")
    for name in ("checkpoint_every", "prefetch_factor"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"option {name!r}: expected None or an integer >= 1, got {value}")
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


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random")
# Bounds of the options a number can make nonsensical (a negative decay, a NaN rate), checked before any data.
_LOWER_BOUNDS = {"lr_base": (0.0, False), "weight_decay": (0.0, True), "warmup_epochs": (0.0, True),
                 "warmup_lr": (0.0, True), "min_lr": (0.0, True), "seed": (0, True), "mixup": (0.0, True),
                 "cutmix": (0.0, True), "color_jitter": (0.0, True)}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(config: TrainConfig) -> None:
    """Finite numbers, lower bounds, per-channel statistics, the crop, the interpolation, the device, the model's
    keyword arguments (architecture arguments only); ConfigError naming the option."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        if isinstance(value, float) and not _finite(value):
            raise ConfigError(f"option {config_field.name!r}: expected a finite number, got {value}")
    for name, (low, inclusive) in _LOWER_BOUNDS.items():
        value = getattr(config, name)
        if value is not None and (value < low or (value == low and not inclusive)):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"option {name!r}: expected a number {relation} {low:g}, got {value}")
    for name in ("mean", "std", "scale"):
        values = getattr(config, name)
        if values is not None and (not values or not all(_finite(value) for value in values)):
            raise ConfigError(f"option {name!r}: expected a list of finite numbers, got {values!r}")
    if config.std is not None and not all(value > 0 for value in config.std):
        raise ConfigError(f"option 'std': expected positive numbers, got {config.std}")
    if not 0.0 < config.crop_pct <= 1.0:
        raise ConfigError(f"option 'crop_pct': expected a fraction in (0, 1], got {config.crop_pct}")
    if config.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"option 'interpolation': expected one of {INTERPOLATIONS}, got {config.interpolation!r}")
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
    """The fields of :class:`TrainConfig`, in declaration order (one command-line flag each)."""
    return list(dataclasses.fields(TrainConfig))


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
