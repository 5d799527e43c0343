"""Building a model from a file the project writes, treating the file as data.

A checkpoint or a Hub-layout folder describes the network it holds (our training checkpoints carry a
``biformer`` metadata entry with the run's configuration; ``config.json`` of a Hub folder carries
``model_args``). That description is untrusted input: only a model's own architecture arguments may come
from it (:func:`architecture_arguments`, the allow-list), never ``pretrained``, ``pretrained_cfg*``,
``checkpoint_path``, file names or URLs, and the network it asks for is built on the ``meta`` device first
and compared with the shapes stored in the weights (:func:`check_weight_shapes`), so a 2 MB folder cannot make
the program allocate a 1 GB network.

:func:`biformer.hub.model_from_checkpoint`, the one function that builds a model from any checkpoint the
project writes, and the trainer's checkpoint reading use these checks. They sit below the trainer and the
loaders (``docs/architecture.md``): nothing here imports from ``train``, ``dense`` or ``hub``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["MAX_MODEL_PARAMETERS", "architecture_arguments", "check_description", "check_hub_folder",
           "check_model_kwargs", "check_weight_shapes", "stored_shapes"]

# A bound on what a description may ask for before its weights are compared (BiFormer-B has 57 M).
MAX_MODEL_PARAMETERS = 2_000_000_000
# Arguments that never come from a file: they point at other files, URLs or downloads (timm's own).
_FORBIDDEN = frozenset({"checkpoint_path", "cache_dir", "file", "url", "hf_hub_id", "features_only"})


def _forbidden(name: str) -> bool:
    return name.startswith("pretrained") or name in _FORBIDDEN


def _model_class(model_name: str) -> type[nn.Module] | None:
    import timm

    from .models.biformer import BiFormer
    from .models.biformer_stl import BiFormerSTL, BiFormerSTLNCHW

    classes = {"biformer_stl": BiFormerSTL, "biformer_stl_nchw": BiFormerSTLNCHW}
    if model_name in classes:
        return classes[model_name]
    return BiFormer if model_name in timm.list_models("biformer*") else None


@cache
def architecture_arguments(model_name: str) -> frozenset[str]:
    """The keyword arguments a checkpoint's description may pass when building ``model_name``.

    They are the parameters of the model class's constructor (depths, widths, ``n_win``, ``topks``, ...),
    without any whose name refers to weights, files or downloads. Empty for models this library does not
    define (their descriptions may then hold no ``model_kwargs``).
    """
    model_class = _model_class(model_name)
    if model_class is None:
        return frozenset()
    names = {
        name for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }
    return frozenset(name for name in names if not _forbidden(name))


@cache
def _backbone_arguments() -> frozenset[str]:
    from .models.backbone import BiFormerBackbone

    names = set(inspect.signature(BiFormerBackbone.__init__).parameters) - {"self", "variant"}
    names |= architecture_arguments("biformer_tiny")
    return frozenset(name for name in names if not _forbidden(name))


def check_model_kwargs(model_name: object, kwargs: object, source: str, *, dense: bool = False) -> dict[str, Any]:
    """``kwargs`` if every key is an architecture argument of ``model_name``, else a one-line ValueError.

    Args:
        model_name: the registered model name the arguments are for.
        kwargs: the mapping read from a checkpoint, a ``config.json`` or a configuration file.
        source: what the message names (``"checkpoint runs/x/last.safetensors: model_kwargs"`` ...).
        dense: the arguments go to :class:`biformer.dense.BiFormerBackbone` (segmentation, detection).
    """
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: expected a mapping of architecture arguments, got {type(kwargs).__name__}")
    allowed = _backbone_arguments() if dense else architecture_arguments(str(model_name))
    refused = sorted(str(key) for key in kwargs if key not in allowed)
    if refused:
        known = f"the architecture arguments of {model_name}: {sorted(allowed)}" if allowed else \
            f"none ({model_name!r} is not a model of this library)"
        raise ValueError(f"{source}: {refused} are not architecture arguments (a checkpoint or configuration may "
                         f"only set {known}; weights, files and downloads are never taken from it)")
    return dict(kwargs)


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``.safetensors`` file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_weight_shapes(build: Any, shapes: Mapping[str, tuple[int, ...]] | None, source: str) -> None:
    """Build the network ``build()`` makes on the ``meta`` device (nothing allocated) and compare its
    parameter and buffer shapes with ``shapes`` (those stored in the weights).

    Raises:
        ValueError: the network asks for more than :data:`MAX_MODEL_PARAMETERS` parameters, or its shapes
            differ from the weights' (lists the first differences).
    """
    with torch.device("meta"):
        model = build()
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    total = sum(math.prod(shape) for shape in own.values())
    if total > MAX_MODEL_PARAMETERS:
        raise ValueError(f"{source}: the description asks for a network of {total} values, over the bound of "
                         f"{MAX_MODEL_PARAMETERS}")
    if shapes is None:  # weights whose shapes cannot be read without loading them: the bound only
        return
    differ = [f"{key}: file {tuple(shapes[key])} vs described {shape}" for key, shape in own.items()
              if key in shapes and tuple(shapes[key]) != shape]
    missing = [key for key in own if key not in shapes]
    if differ or missing:
        raise ValueError(f"{source}: the weights do not fit the network the description asks for (shapes differ: "
                         f"{differ[:3]}; missing in the file: {missing[:3]})")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_description(description: object, path: str | os.PathLike) -> dict[str, Any]:
    """The ``biformer`` metadata of a training checkpoint, checked: a mapping with ``config`` (a mapping naming
    a model) and ``data`` (class names, channels, input size, normalisation). One-line ValueError otherwise."""
    where = f"checkpoint {path}: metadata 'biformer'"
    if not isinstance(description, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'config' and 'data', got {type(description).__name__}")
    config, data = description.get("config"), description.get("data")
    if not isinstance(config, Mapping) or not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected mappings under 'config' and 'data', got {sorted(description)}")
    if not isinstance(config.get("model"), str):
        raise ValueError(f"{where}: 'config' names no model (expected a string under 'model')")
    names = data.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}: 'data.class_names' must be a non-empty list of strings, got {names!r:.80}")
    for key in ("in_chans", "input_size"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16384:
            raise ValueError(f"{where}: 'data.{key}' must be an integer in [1, 16384], got {value!r:.80}")
    # Classification checkpoints carry their preprocessing; dense ones (segmentation, detection) normalise inside
    # the model and store none: checked where present.
    classification = config.get("task", "classification") == "classification"
    for key in ("mean", "std"):
        value = data.get(key)
        if value is None and not classification:
            continue
        if not isinstance(value, list) or len(value) != data["in_chans"] or not all(map(_is_number, value)):
            raise ValueError(f"{where}: 'data.{key}' must be {data['in_chans']} finite numbers, got {value!r:.80}")
        if key == "std" and not all(number > 0 for number in value):
            raise ValueError(f"{where}: 'data.std' must be positive, got {value}")
    crop = data.get("crop_pct")
    if (crop is not None or classification) and (not _is_number(crop) or not 0 < crop <= 1):
        raise ValueError(f"{where}: 'data.crop_pct' must be a number in (0, 1], got {crop!r:.80}")
    return dict(description)


def check_hub_folder(directory: Path, config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """Check a Hub-layout folder's ``config.json`` before timm builds anything from it: ``model_args`` holds only
    architecture arguments, and the network they describe fits the stored weights (:func:`check_weight_shapes`).

    ``kwargs`` are the caller's own ``timm.create_model`` arguments (code, not data): they are not checked.
    """
    import timm

    architecture = config["architecture"]
    model_args = check_model_kwargs(architecture, config.get("model_args") or {},
                                    f"pretrained folder {directory}: config.json model_args")
    if "num_classes" not in model_args and isinstance(config.get("num_classes"), int):
        model_args["num_classes"] = config["num_classes"]  # timm's config.json keeps it at the top level
    weights = directory / "model.safetensors"
    try:
        shapes = stored_shapes(weights) if weights.is_file() else None
    except Exception as error:  # noqa: BLE001 - safetensors' header errors: one meaning for the user
        raise ValueError(f"pretrained folder {directory}: cannot load the weights ({type(error).__name__}: "
                         f"{error})") from error
    check_weight_shapes(lambda: timm.create_model(architecture, **model_args), shapes,
                        f"pretrained folder {directory}")
