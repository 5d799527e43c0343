"""Image classification, the first :class:`~biformer.train.task.Task`.

Data: Fashion-MNIST, an ImageFolder tree or CSV lists (:mod:`biformer.train.data`), with timm's transforms.
Model: any timm model name (``biformer_nano`` by default), optionally fine-tuned from a weights file.
Loss: cross-entropy with label smoothing, or soft-target cross-entropy after timm's mixup/cutmix.
Metrics: top-1 and top-5 accuracy, mean loss, per-class accuracy and the confusion matrix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.models import adapt_input_conv

from ..checkpoint import read_state_dict
from ..model_files import check_model_kwargs
from .config import TrainConfig
from .data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    CsvImageDataset,
    DataError,
    FashionMNIST,
    collate_classification,
    find_fashion_mnist,
    image_folder,
)
from .errors import ConfigError
from .options import TaskOptions, check_counts, option
from .task import MetricSums, Task, TaskData, register_task

__all__ = ["ClassificationMetrics", "ClassificationOptions", "ClassificationTask", "load_pretrained"]

DATASETS = ("fashion-mnist", "imagefolder", "csv")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ClassificationOptions(TaskOptions):
    """The options only classification reads: image channels and preprocessing, timm's augmentation, mixup and
    label smoothing (flags ``--in-chans``, ``--mixup`` ...; YAML keys of the same names)."""

    # --- data -----------------------------------------------------------------------------------
    download: bool = option(True, "fashion-mnist: download with torchvision when it is not installed")
    in_chans: int | None = option(None, "image channels (None: 1 for fashion-mnist, else 3)")
    mean: list | None = option(None, "per-channel normalisation mean (None: the dataset's or ImageNet's)")
    std: list | None = option(None, "per-channel normalisation std (None: the dataset's or ImageNet's)")
    interpolation: str = option("bilinear", "resize interpolation (bilinear, bicubic)")
    crop_pct: float = option(1.0, "evaluation: resize to input_size / crop_pct, then centre crop")
    # --- augmentation (timm) --------------------------------------------------------------------
    scale: list = option([0.75, 1.0], "random-resized-crop area range")
    hflip: float = option(0.5, "horizontal flip probability")
    color_jitter: float | None = option(None, "colour jitter strength (None: off)")
    auto_augment: str | None = option(
        None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1-mmax9 (RandAugment); None: off"
    )
    reprob: float = option(0.0, "random erasing probability")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch")
    smoothing: float = option(0.1, "label smoothing")

    def validate(self, config: Any) -> None:
        """Ranges of the preprocessing and augmentation options; ConfigError naming the option."""
        check_counts(self, optional_counts=("in_chans",))
        for name in ("hflip", "reprob", "mixup_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"option {name!r}: expected a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"option 'smoothing': expected a value in [0, 1), got {self.smoothing}")
        if (self.mixup > 0 or self.cutmix > 0) and config.batch_size % 2:
            raise ConfigError(f"option 'batch_size': mixup/cutmix need an even batch size, got {config.batch_size}")
        for name in ("mixup", "cutmix", "color_jitter"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"option {name!r}: expected a number >= 0, got {value}")
        for name in ("mean", "std", "scale"):
            values = getattr(self, name)
            if values is not None and (not values or not all(_finite(value) for value in values)):
                raise ConfigError(f"option {name!r}: expected a list of finite numbers, got {values!r}")
        if self.std is not None and not all(value > 0 for value in self.std):
            raise ConfigError(f"option 'std': expected positive numbers, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"option 'crop_pct': expected a fraction in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"option 'interpolation': expected one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"option 'scale': expected [min, max] with 0 < min <= max <= 1, got {self.scale}")


def _channels_stats(values: tuple[float, ...], in_chans: int) -> list[float]:
    """Per-channel normalisation stats for ``in_chans`` channels from 1- or 3-channel ones."""
    if len(values) == in_chans:
        return list(values)
    if in_chans == 1:
        return [sum(values) / len(values)]
    return [values[0]] * in_chans if len(values) == 1 else [sum(values) / len(values)] * in_chans


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a weights file (ours or the authors') into ``model`` for fine-tuning.

    The classifier (``model.get_classifier()``) is kept fresh when its shape differs from the file's (another
    class count); the stem conv is adapted with timm's ``adapt_input_conv`` when the channel count differs
    (e.g. ImageNet weights on grayscale images). Returns the names of the parameters left freshly
    initialised.

    Raises:
        ValueError: the file does not fit the architecture (lists the keys).
    """
    state_dict = read_state_dict(path)
    own = model.state_dict()
    head_prefix = next((name for name, module in model.named_modules() if module is model.get_classifier()), "head")
    head_keys = {key for key in own if key.startswith(head_prefix + ".")}
    for key in [k for k in state_dict if k.startswith(head_prefix + ".")]:
        if key not in own or own[key].shape != state_dict[key].shape:
            del state_dict[key]  # another class count: the model keeps its fresh head
    first_conv = model.pretrained_cfg.get("first_conv") if hasattr(model, "pretrained_cfg") else None
    if first_conv and f"{first_conv}.weight" in state_dict:
        key = f"{first_conv}.weight"
        if state_dict[key].shape[1] != own[key].shape[1]:
            state_dict[key] = adapt_input_conv(own[key].shape[1], state_dict[key], base_chans=state_dict[key].shape[1])
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict) - head_keys)
    unexpected = sorted(set(state_dict) - set(own))
    if mismatched or missing or unexpected:
        raise ValueError(
            f"pretrained: {path} does not fit {type(model).__name__}: shapes differ {mismatched[:5]}, "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]} (is it the same model and kwargs?)"
        )
    model.load_state_dict(state_dict, strict=False)
    return sorted(head_keys - set(state_dict))


@register_task
class ClassificationTask(Task):
    """Image classification with timm models; see the module docstring."""

    name = "classification"
    main_metric = "top1"
    plot_metrics = ("top1",)
    options_class = ClassificationOptions
    options: ClassificationOptions

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.dataset not in DATASETS:
            raise ConfigError(f"option 'dataset': expected one of {DATASETS}, got {config.dataset!r}")
        self.mixup: Mixup | None = None  # made by build_data, which knows the class count

    # --- data ----------------------------------------------------------------------------------
    def data_info(self, class_names: list[str]) -> dict[str, Any]:
        """What the model and preprocessing depend on, stored in checkpoints."""
        config = self.config
        options = self.options
        in_chans = options.in_chans or (1 if config.dataset == "fashion-mnist" else 3)
        if config.dataset == "fashion-mnist":
            default_mean, default_std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        else:
            default_mean, default_std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        for name in ("mean", "std"):
            given = getattr(options, name)
            if given is not None and len(given) not in (1, in_chans):
                raise ConfigError(f"option {name!r}: expected 1 or {in_chans} values (one per channel), got "
                                  f"{len(given)}: {given}")
        input_size = config.input_size or timm.get_pretrained_cfg_value(config.model, "input_size")[-1]
        return dict(
            class_names=list(class_names), in_chans=in_chans, input_size=int(input_size),
            mean=_channels_stats(tuple(options.mean or default_mean), in_chans),
            std=_channels_stats(tuple(options.std or default_std), in_chans),
            interpolation=options.interpolation, crop_pct=options.crop_pct,
        )

    def transform(self, info: dict[str, Any], training: bool) -> Any:
        """timm's training or evaluation transform for the data described by ``info``."""
        options = self.options
        common = dict(input_size=info["input_size"], interpolation=info["interpolation"], mean=info["mean"],
                      std=info["std"])
        if not training:
            return create_transform(is_training=False, crop_pct=info["crop_pct"], **common)
        return create_transform(
            is_training=True, scale=tuple(options.scale), hflip=options.hflip, color_jitter=options.color_jitter,
            auto_augment=options.auto_augment, re_prob=options.reprob, re_mode="pixel", **common,
        )

    def _datasets(self, mode: str) -> tuple[Any, Any, list[str]]:
        """(train factory, eval factory, class names): factories take (transform, classes)."""
        config = self.config
        options = self.options
        if config.dataset == "fashion-mnist":
            folder = find_fashion_mnist(config.data_dir, options.download)
            return (lambda t, c: FashionMNIST(folder, "train", t, mode),
                    lambda t, c: FashionMNIST(folder, "test", t, mode), list(FashionMNIST.classes))
        if config.data_dir is None:
            raise ConfigError(f"option 'data_dir': required for dataset {config.dataset!r}")
        root = os.path.expanduser(config.data_dir)
        if config.dataset == "imagefolder":
            train_root, eval_root = os.path.join(root, config.train_split), os.path.join(root, config.val_split)
            probe = image_folder(train_root if os.path.isdir(train_root) else eval_root, None, mode)
            return (lambda t, c: image_folder(train_root, t, mode, c),
                    lambda t, c: image_folder(eval_root, t, mode, c), list(probe.classes))
        train_csv = os.path.join(root, config.train_split + ".csv")
        eval_csv = os.path.join(root, config.val_split + ".csv")
        probe = CsvImageDataset(train_csv if os.path.isfile(train_csv) else eval_csv, None, mode)
        return (lambda t, c: CsvImageDataset(train_csv, t, mode, c),
                lambda t, c: CsvImageDataset(eval_csv, t, mode, c), probe.classes)

    def build_data(self, splits: tuple[str, ...] = ("train", "eval"), info: dict[str, Any] | None = None) -> TaskData:
        """Datasets for ``splits``; ``info`` (from a checkpoint) fixes class names and preprocessing."""
        in_chans = (info or {}).get("in_chans") or self.options.in_chans
        in_chans = in_chans or (1 if self.config.dataset == "fashion-mnist" else 3)
        mode = "L" if in_chans == 1 else "RGB"
        if in_chans not in (1, 3):
            raise ConfigError(f"option 'in_chans': images are read as 1 (L) or 3 (RGB) channels, got {in_chans}")
        if "train" in splits and self.config.batch_size < 2:
            raise ConfigError(f"option 'batch_size': training needs at least 2 images per step (the BatchNorm "
                              f"layers' batch statistics), got {self.config.batch_size}")
        make_train, make_eval, class_names = self._datasets(mode)
        if "train" in splits and info is None and len(class_names) < 2:
            raise DataError(f"{self.config.dataset}: training needs at least 2 classes, found {len(class_names)} "
                            f"({class_names}); a one-class classifier is always right")
        info = info or self.data_info(class_names)
        classes = info["class_names"]
        train = make_train(self.transform(info, True), classes) if "train" in splits else None
        evaluation = make_eval(self.transform(info, False), classes) if "eval" in splits else None
        for split, dataset in (("train", train), ("eval", evaluation)):
            if dataset is not None and len(dataset) == 0:
                raise DataError(f"{self.config.dataset}: the {split} split is empty")
        options = self.options
        if options.mixup > 0 or options.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=options.mixup, cutmix_alpha=options.cutmix, prob=options.mixup_prob,
                               label_smoothing=options.smoothing, num_classes=len(classes))
        return TaskData(train=train, eval=evaluation, collate_fn=collate_classification, info=info)

    # --- model ---------------------------------------------------------------------------------
    def check_options(self) -> None:
        """The model name, ``model_kwargs``, ``in_chans`` and the ``pretrained`` file, before any data is read:
        the model is built for placeholder data (10 classes; the class count comes from the data later) and
        the weights are loaded into it. The global random generators are left as they were.

        Raises:
            ConfigError: naming the option.
        """
        config = self.config
        options = self.options
        in_chans = options.in_chans or (1 if config.dataset == "fashion-mnist" else 3)
        if in_chans not in (1, 3):
            raise ConfigError(f"option 'in_chans': images are read as 1 (L) or 3 (RGB) channels, got {in_chans}")
        if config.pretrained and not os.path.isfile(os.path.expanduser(config.pretrained)):
            raise ConfigError(f"option 'pretrained': no such file: {config.pretrained}")
        info = dict(class_names=list(FashionMNIST.classes), in_chans=in_chans)
        with torch.random.fork_rng(devices=[]):
            model = self._create_model(info)
            if config.pretrained:
                try:
                    load_pretrained(model, os.path.expanduser(config.pretrained))
                except (FileNotFoundError, ValueError) as error:
                    message = str(error).removeprefix("pretrained: ").removeprefix("checkpoint: ")
                    raise ConfigError(f"option 'pretrained': {message}") from error

    def _create_model(self, info: dict[str, Any]) -> nn.Module:
        """The timm model for ``info`` (class count and channels), with fresh weights."""
        config = self.config
        if config.model not in timm.list_models():
            raise ConfigError(
                f"option 'model': unknown timm model {config.model!r}; BiFormer models: "
                f"{timm.list_models('biformer*')}"
            )
        try:
            kwargs = check_model_kwargs(config.model, config.model_kwargs, "option 'model_kwargs'")
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if config.drop_path:
            kwargs["drop_path_rate"] = config.drop_path
        try:
            return timm.create_model(config.model, num_classes=len(info["class_names"]),
                                     in_chans=info["in_chans"], **kwargs)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise ConfigError(f"option 'model_kwargs': cannot build {config.model} with {kwargs}: {error}") from error

    def build_model(self, info: dict[str, Any]) -> nn.Module:
        config = self.config
        model = self._create_model(info)
        if config.pretrained:
            load_pretrained(model, config.pretrained)
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    # --- loss and metrics ----------------------------------------------------------------------
    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, labels = batch  # (N, C, H, W), (N,)
        if self.mixup is not None:
            images, soft_targets = self.mixup(images, labels)  # soft_targets: (N, classes)
            return SoftTargetCrossEntropy()(model(images), soft_targets), len(labels)
        return F.cross_entropy(model(images).float(), labels, label_smoothing=self.options.smoothing), len(labels)

    def new_metrics(self, info: dict[str, Any]) -> ClassificationMetrics:
        return ClassificationMetrics(len(info["class_names"]))


class ClassificationMetrics(MetricSums):
    """Confusion matrix, top-5 hits and summed loss; everything else derives from them."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # (true, predicted)
        self.top5_hits = torch.zeros((), dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    def update(self, model: nn.Module, batch: Any) -> None:
        images, labels = batch  # (N, C, H, W), (N,)
        logits = model(images).float()  # (N, classes)
        self._add(logits, labels)

    def _add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add logits (N, classes) against labels (N,)."""
        labels = labels.to(logits.device)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        predicted = logits.argmax(dim=1)
        flat = (labels * self.num_classes + predicted).cpu()
        self.confusion += torch.bincount(flat, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        ).double()  # (true, predicted)
        k = min(5, self.num_classes)
        top = logits.topk(k, dim=1).indices  # (N, k)
        self.top5_hits += (top == labels[:, None]).any(dim=1).sum().double().cpu()

    def sums(self) -> list[torch.Tensor]:
        return [self.confusion, self.top5_hits, self.loss_sum]

    def compute(self) -> dict[str, Any]:
        total = self.confusion.sum().item()
        if total == 0:
            raise ValueError("metrics: no samples were evaluated")
        per_class_total = self.confusion.sum(dim=1)  # (classes,)
        per_class = (self.confusion.diagonal() / per_class_total.clamp(min=1)).tolist()
        return dict(
            top1=100.0 * self.confusion.diagonal().sum().item() / total,
            top5=100.0 * self.top5_hits.item() / total,
            loss=self.loss_sum.item() / total,
            samples=int(total),
            per_class_top1=[100.0 * value for value in per_class],
            confusion=self.confusion.long().tolist(),
        )
