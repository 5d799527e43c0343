"""``biformer train --task segmentation`` / ``--task detection``: the engine's Tasks over the dense task objects.

These adapters turn a :class:`~biformer.train.config.TrainConfig` into a
:class:`~biformer.dense.tasks.SegmentationTask` or :class:`~biformer.dense.tasks.DetectionTask` (which hold the
loss and the metrics) and its datasets; the generic engine does the rest (progress bars, run folder,
checkpoints, ``--resume``, torchrun).

Options and what they mean here (the shared ones are TrainConfig fields; ``architecture``, ``train_scenes``,
``val_scenes`` and ``head_channels`` are both dense tasks' own, :class:`DenseOptions`; segmentation adds
``num_classes`` and ``aux_head``, :class:`SegmentationOptions`; they are in ``config.options``):

- ``architecture``: ``semantic_fpn`` (default) or ``upernet``; ``maskrcnn`` (default) or ``retinanet``.
- ``model``: the backbone: ``shallow`` (default, about 1.9 M parameters with its head), ``micro`` (see
  :data:`~biformer.dense.tasks.PRESETS`) or ``biformer_tiny`` / ``biformer_small`` / ``biformer_base``.
  ``model_kwargs``: more :class:`~biformer.dense.BiFormerBackbone` arguments; ``n_win`` defaults to ``"auto"``
  (:func:`~biformer.models.backbone.auto_n_win`: 4 for 128 px scenes). ``pretrained``: backbone weights
  (classification or dense checkpoints, loaded with :func:`~biformer.dense.load_backbone_weights`).
- ``dataset``: ``scenes`` (default; the built-in Fashion-MNIST scenes, ``train_scenes`` / ``val_scenes`` of
  ``input_size`` px, composed once and kept in memory; ``data_dir``: the Fashion-MNIST idx folder when not
  the Debian package's), ``coco`` (detection: ``data_dir/TRAIN_SPLIT`` images
  with ``data_dir/annotations/instances_TRAIN_SPLIT.json``, the COCO layout) or ``maskfolder`` (segmentation:
  ``data_dir/images/SPLIT`` and ``data_dir/annotations/SPLIT`` PNG masks of class ids, the ADE20K layout,
  with ``num_classes``).
- ``input_size``: scenes' side; detection: torchvision's ``min_size`` (``max_size`` = input_size for scenes,
  ``input_size * 1333 / 800`` for COCO). ``head_channels``: head width (default 64). ``aux_head``: UperNet's
  auxiliary FCN head (on by default).
- Classification's options (augmentation, mixup, label smoothing, ``crop_pct`` ...) are refused.

The tasks' :attr:`defaults` replace the classification quick start's values (listed in docs/dense.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.backbone import load_backbone_weights
from ..train.config import TrainConfig
from ..train.errors import ConfigError, DataError
from ..train.options import TaskOptions, check_counts, option
from ..train.task import MetricSums, Task, TaskData, register_task
from .loaders import CocoDetectionDataset, MaskFolderDataset
from .tasks import (
    DETECTION_ARCHITECTURES,
    PRESETS,
    SEGMENTATION_ARCHITECTURES,
    CachedDataset,
    DetectionTask,
    SegmentationTask,
    cpu_model_options,
)

__all__ = ["DenseEngineTask", "DenseOptions", "DetectionEngineTask", "SegmentationEngineTask", "SegmentationOptions"]

NAMED_BACKBONES = ("biformer_tiny", "biformer_small", "biformer_base")
# Shared by both tasks: the small CPU recipe on 128 px scenes, 1 thread, composed scenes in memory (no worker).
COMMON_DEFAULTS: dict[str, Any] = dict(
    dataset="scenes", model="shallow", model_kwargs={}, input_size=128, batch_size=8, lr_base_size=8,
    clip_grad=5.0, workers=0, warmup_epochs=0.25, min_lr=1e-5,
)


@dataclass
class DenseOptions(TaskOptions):
    """The options segmentation and detection read and classification does not (flags ``--architecture``,
    ``--train-scenes`` ...; YAML keys of the same names); detection's options."""

    architecture: str | None = option(
        None, "segmentation: semantic_fpn or upernet; detection: maskrcnn or retinanet (None: semantic_fpn / "
        "maskrcnn)"
    )
    train_scenes: int = option(4000, "dataset scenes: training scenes (from Fashion-MNIST's training crops)")
    val_scenes: int = option(500, "dataset scenes: evaluation scenes (from Fashion-MNIST's test crops)")
    head_channels: int | None = option(
        None, "width of the segmentation head / the detection FPN (None: 64, the CPU recipe)"
    )

    def validate(self, config: Any) -> None:
        """Counts and widths: ConfigError naming the option."""
        check_counts(self, ("train_scenes", "val_scenes"), ("head_channels",))


@dataclass
class SegmentationOptions(DenseOptions):
    """Segmentation's options: the dense ones, plus the mask folder's class count and UperNet's auxiliary head
    (detection has neither, so ``--task detection`` refuses them)."""

    num_classes: int | None = option(
        None, "dataset maskfolder: classes in the masks, background included (ids 0..num_classes-1, 255 ignored)"
    )
    aux_head: bool = option(True, "upernet: the auxiliary FCN head on stage 3 (loss weight 0.4, training only)")

    def validate(self, config: Any) -> None:
        """Counts and widths: ConfigError naming the option."""
        super().validate(config)
        check_counts(self, (), ("num_classes",))


class DenseEngineTask(Task):
    """What segmentation and detection share: options, datasets, the dense task object."""

    architectures: ClassVar[dict[str, Any]]
    datasets: ClassVar[tuple[str, ...]]
    default_architecture: ClassVar[str]
    options_class = DenseOptions
    options: DenseOptions

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.dataset not in self.datasets:
            raise ConfigError(f"option 'dataset': --task {self.name} expects one of {self.datasets}, "
                              f"got {config.dataset!r}")
        self.architecture = self.options.architecture or self.default_architecture
        if self.architecture not in self.architectures:
            raise ConfigError(f"option 'architecture': --task {self.name} expects one of "
                              f"{sorted(self.architectures)}, got {self.architecture!r}")
        if config.model not in PRESETS and config.model not in NAMED_BACKBONES:
            raise ConfigError(f"option 'model': expected a backbone preset {sorted(PRESETS)} or one of "
                              f"{NAMED_BACKBONES}, got {config.model!r}")
        if config.dataset != "scenes" and config.data_dir is None:
            raise ConfigError(f"option 'data_dir': required for dataset {config.dataset!r}")
        self.dense: SegmentationTask | DetectionTask | None = None

    # --- data ----------------------------------------------------------------------------------
    def _split_path(self, *parts: str) -> Path:
        return Path(os.path.expanduser(self.config.data_dir)).joinpath(*parts)

    def _own_datasets(self, splits: tuple[str, ...]) -> tuple[Dataset | None, Dataset | None, list[str]]:
        """(train, eval, class names) for the ``coco`` or ``maskfolder`` dataset."""
        raise NotImplementedError

    def build_data(self, splits: tuple[str, ...] = ("train", "eval"), info: dict[str, Any] | None = None) -> TaskData:
        config = self.config
        if config.dataset == "scenes":
            train, evaluation, class_names = self._scenes(splits)
        else:
            train, evaluation, class_names = self._own_datasets(splits)
        if info is not None and len(info["class_names"]) != len(class_names):
            raise DataError(f"{config.dataset}: the data has {len(class_names)} classes, the checkpoint "
                            f"{len(info['class_names'])}")
        info = info or dict(class_names=list(class_names), num_classes=len(class_names), in_chans=3,
                            input_size=config.input_size)
        return TaskData(train=train, eval=evaluation, collate_fn=self._dense_task(info).collate_fn, info=info)

    def _scenes(self, splits: tuple[str, ...]) -> tuple[Dataset | None, Dataset | None, list[str]]:
        config = self.config
        if config.input_size is None or config.input_size < 28:
            raise ConfigError(f"option 'input_size': scenes need at least 28 px (a Fashion-MNIST crop), "
                              f"got {config.input_size}")
        dense_class = SegmentationTask if self.name == "segmentation" else DetectionTask
        try:
            scenes = dense_class.scenes(train_scenes=self.options.train_scenes, val_scenes=self.options.val_scenes,
                                        image_size=config.input_size, seed=config.seed,
                                        root=config.data_dir, architecture=self.architecture)
        except FileNotFoundError as error:
            raise DataError(f"dataset scenes: {error}") from error
        train = CachedDataset(scenes.train_dataset) if "train" in splits else None
        evaluation = CachedDataset(scenes.val_dataset) if "eval" in splits else None
        return train, evaluation, list(scenes.train_dataset.class_names)

    # --- model ---------------------------------------------------------------------------------
    def _model_options(self) -> dict[str, Any]:
        config = self.config
        backbone_options = {"n_win": "auto", "batch_norm": "train", **config.model_kwargs}
        if config.drop_path:
            backbone_options["drop_path_rate"] = config.drop_path
        return cpu_model_options(self.name, self.architecture, self.options.head_channels, backbone_options,
                                 auxiliary_head=getattr(self.options, "aux_head", False))

    def _dense_task(self, info: dict[str, Any]) -> SegmentationTask | DetectionTask:
        raise NotImplementedError

    def check_options(self) -> None:
        """``num_classes`` (maskfolder), ``input_size`` (scenes), the backbone, ``model_kwargs`` and the
        ``pretrained`` file, before any data is read or scene composed: the model is built for placeholder
        data (the scenes' 11 classes, ``num_classes``, or 2 for COCO, whose classes come from the annotations)
        and the backbone weights are loaded into it. The global random generators are left as they were.

        Raises:
            ConfigError: naming the option.
        """
        config = self.config
        maskfolder = config.dataset == "maskfolder"  # segmentation only: detection's datasets are scenes and coco
        if maskfolder and self.options.num_classes is None:
            raise ConfigError("option 'num_classes': required for dataset 'maskfolder' (classes in the masks)")
        if config.dataset == "scenes" and (config.input_size is None or config.input_size < 28):
            raise ConfigError(f"option 'input_size': scenes need at least 28 px (a Fashion-MNIST crop), "
                              f"got {config.input_size}")
        if config.pretrained and not os.path.isfile(os.path.expanduser(config.pretrained)):
            raise ConfigError(f"option 'pretrained': no such file: {config.pretrained}")
        num_classes = self.options.num_classes if maskfolder else {"scenes": 11}.get(config.dataset, 2)
        info = dict(class_names=[f"class {index}" for index in range(num_classes)], num_classes=num_classes,
                    in_chans=3, input_size=config.input_size)
        with torch.random.fork_rng(devices=[]):
            model = self._create_model(self._dense_task(info))
            if config.pretrained:
                try:
                    load_backbone_weights(self._backbone(model), os.path.expanduser(config.pretrained))
                except (FileNotFoundError, ValueError) as error:
                    message = str(error).removeprefix("pretrained: ").removeprefix("checkpoint: ")
                    raise ConfigError(f"option 'pretrained': {message}") from error

    def _backbone(self, model: nn.Module) -> nn.Module:
        return model.backbone.body if self.name == "detection" else model.backbone

    def _create_model(self, dense: SegmentationTask | DetectionTask) -> nn.Module:
        try:
            return dense.build_model()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"option 'model_kwargs': cannot build {self.architecture} on {self.config.model} "
                              f"with {self.config.model_kwargs}: {error}") from error

    def build_model(self, info: dict[str, Any]) -> nn.Module:
        self.dense = self._dense_task(info)
        model = self._create_model(self.dense)
        if self.config.pretrained:
            load_backbone_weights(self._backbone(model), self.config.pretrained)
        if self.config.grad_checkpointing:
            self._backbone(model).set_grad_checkpointing(True)
        return model

    # --- loss and metrics ----------------------------------------------------------------------
    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Any, int]:
        loss, _parts = self.dense.loss(model, batch)
        return loss, len(batch[0])

    def new_metrics(self, info: dict[str, Any]) -> MetricSums:
        return self._dense_task(info).new_metrics()


def _variant(config: TrainConfig) -> str | dict:
    return dict(PRESETS[config.model]) if config.model in PRESETS else config.model


@register_task
class SegmentationEngineTask(DenseEngineTask):
    """``--task segmentation``: Semantic FPN or UperNet, cross-entropy, mIoU."""

    name = "segmentation"
    main_metric = "mIoU"
    plot_metrics = ("mIoU",)
    architectures = SEGMENTATION_ARCHITECTURES
    datasets = ("scenes", "maskfolder")
    default_architecture = "semantic_fpn"
    options_class = SegmentationOptions
    options: SegmentationOptions
    defaults: ClassVar[dict[str, Any]] = dict(COMMON_DEFAULTS, lr_base=2e-3, epochs=8)

    def _own_datasets(self, splits: tuple[str, ...]) -> tuple[Dataset | None, Dataset | None, list[str]]:
        config = self.config
        if self.options.num_classes is None:
            raise ConfigError("option 'num_classes': required for dataset 'maskfolder' (classes in the masks)")

        def folder(split: str) -> MaskFolderDataset:
            return MaskFolderDataset(self._split_path("images", split), self._split_path("annotations", split),
                                     self.options.num_classes)

        try:
            train = folder(config.train_split) if "train" in splits else None
            evaluation = folder(config.val_split) if "eval" in splits else None
        except FileNotFoundError as error:
            raise DataError(f"dataset maskfolder: {error}") from error
        return train, evaluation, ["background", *(f"class {i}" for i in range(1, self.options.num_classes))]

    def _dense_task(self, info: dict[str, Any]) -> SegmentationTask:
        return SegmentationTask(None, None, info["num_classes"], architecture=self.architecture,
                                variant=_variant(self.config), model_options=self._model_options())


@register_task
class DetectionEngineTask(DenseEngineTask):
    """``--task detection``: Mask R-CNN or RetinaNet (torchvision), COCO mAP (main: mAP@0.5)."""

    name = "detection"
    main_metric = "mAP@0.5"
    plot_metrics = ("mAP@0.5", "mAP")
    architectures = DETECTION_ARCHITECTURES
    datasets = ("scenes", "coco")
    default_architecture = "maskrcnn"
    defaults: ClassVar[dict[str, Any]] = dict(COMMON_DEFAULTS, lr_base=1e-3, epochs=3)

    def _own_datasets(self, splits: tuple[str, ...]) -> tuple[Dataset | None, Dataset | None, list[str]]:
        with_masks = self.architecture == "maskrcnn"

        def coco(split: str) -> CocoDetectionDataset:
            return CocoDetectionDataset(self._split_path(split),
                                        self._split_path("annotations", f"instances_{split}.json"), with_masks)

        try:
            train = coco(self.config.train_split) if "train" in splits else None
            evaluation = coco(self.config.val_split) if "eval" in splits else None
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"dataset coco: {error}") from error
        return train, evaluation, list((train or evaluation).class_names)

    def _dense_task(self, info: dict[str, Any]) -> DetectionTask:
        config = self.config
        size = info["input_size"]
        max_size = size if config.dataset == "scenes" else round(size * 1333 / 800)
        options = {**self._model_options(), "min_size": size, "max_size": max_size}
        return DetectionTask(None, None, info["num_classes"], architecture=self.architecture,
                             variant=_variant(config), model_options=options)
