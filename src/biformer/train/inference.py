"""Rebuilding a trained model from a weights file, for ``biformer eval`` and ``biformer predict``.

Our ``.safetensors`` checkpoints describe themselves (configuration, class names, preprocessing; see
:mod:`biformer.train.checkpoints`). Other files (the authors' ``.pth``, bare state_dicts) need the timm
model name; their class count is read from the head's shape, their preprocessing is the model's
pretrained configuration (224 px, bicubic, crop 0.875, ImageNet statistics) and a 1000-class head gets
ImageNet's classes (synsets such as ``n01440764`` as class names, matching an ImageNet validation folder,
and readable descriptions in ``info["class_descriptions"]``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import timm
import torch.nn as nn
from timm.data import ImageNetInfo

from ..checkpoint import load_checkpoint, read_state_dict
from ..model_files import check_description, check_model_kwargs, check_weight_shapes, stored_shapes
from .checkpoints import read_metadata
from .config import TrainConfig, load_config
from .errors import ConfigError
from .task import Task, get_task

__all__ = ["LoadedModel", "load_for_inference"]


@dataclass
class LoadedModel:
    """A model in eval mode with the task, configuration and data description it was trained with."""

    model: nn.Module
    task: Task
    config: TrainConfig
    info: dict[str, Any]


def _foreign_checkpoint_config(path: str | os.PathLike, model_name: str | None) -> tuple[dict, dict]:
    """(configuration values, data description) for a weights file without our metadata."""
    if model_name is None:
        raise ConfigError(
            f"--model: {path} is not a biformer training checkpoint (no description inside); pass the timm "
            f"model name it belongs to, e.g. --model biformer_tiny ({timm.list_models('biformer*')})"
        )
    if model_name not in timm.list_models():
        raise ConfigError(
            f"--model: unknown timm model {model_name!r}; BiFormer models: {timm.list_models('biformer*')}"
        )
    state_dict = read_state_dict(path)
    head = state_dict.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 1000
    pretrained_cfg = timm.get_pretrained_cfg(model_name).to_dict()
    descriptions = None
    if num_classes == 1000:  # ImageNet: synsets match the folder names of an ImageNet validation tree
        imagenet = ImageNetInfo()
        class_names = list(imagenet.label_names())
        descriptions = [imagenet.index_to_description(index) for index in range(1000)]
    else:
        class_names = [f"class {index}" for index in range(num_classes)]
    first_conv = state_dict.get(f"{pretrained_cfg.get('first_conv')}.weight")
    in_chans = int(first_conv.shape[1]) if first_conv is not None else 3
    values = dict(model=model_name, model_kwargs={}, input_size=pretrained_cfg["input_size"][-1],
                  interpolation=pretrained_cfg["interpolation"], crop_pct=pretrained_cfg["crop_pct"],
                  in_chans=in_chans, dataset="imagefolder")
    info = dict(class_names=class_names, in_chans=in_chans, input_size=pretrained_cfg["input_size"][-1],
                mean=list(pretrained_cfg["mean"])[:in_chans], std=list(pretrained_cfg["std"])[:in_chans],
                interpolation=pretrained_cfg["interpolation"], crop_pct=pretrained_cfg["crop_pct"])
    if descriptions:
        info["class_descriptions"] = descriptions
    return values, info


def load_for_inference(path: str | os.PathLike, model_name: str | None = None,
                       overrides: dict[str, Any] | None = None) -> LoadedModel:
    """Build the model a weights file belongs to and load it (eval mode, on CPU).

    Args:
        path: our ``.safetensors`` checkpoint, or another weights file (then ``model_name`` is required).
        model_name: timm model name; for our checkpoints it must match the stored one when given.
        overrides: configuration values to change (e.g. the evaluation dataset).

    Raises:
        FileNotFoundError, ValueError (unreadable file, keys that do not fit), ConfigError.
    """
    if os.path.isdir(path):
        raise ValueError(f"checkpoint: {path} is a folder; expected a weights file (RUN/checkpoints/best.safetensors, "
                         f"the authors' .pth); a Hub-layout folder is read by `biformer export --model` and "
                         f"biformer.hub.load_pretrained")
    description = read_metadata(path) if os.fspath(path).endswith(".safetensors") else None
    if description is None and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    if description is not None:
        description = check_description(description, path)
        values, info = dict(description["config"]), dict(description["data"])
        if model_name is not None and model_name != values["model"]:
            raise ConfigError(f"--model: {path} holds a {values['model']}, not a {model_name}")
    else:
        values, info = _foreign_checkpoint_config(path, model_name)
    values.update(pretrained=None, name=None)  # the stored run name and output are never used (nor written to)
    config = load_config((values, str(path)), (dict(overrides or {}), "flags"))
    task = get_task(config)
    if description is not None:  # the description is data: architecture arguments only, checked against the weights
        check_model_kwargs(config.model, config.model_kwargs, f"checkpoint {path}: model_kwargs",
                           dense=config.task != "classification")
        check_weight_shapes(lambda: task.build_model(info), stored_shapes(path), f"checkpoint {path}")
    model = task.build_model(info)
    load_checkpoint(model, path)
    return LoadedModel(model=model.eval(), task=task, config=config, info=info)
