"""Sharing models: folders in the Hugging Face Hub layout, loading by name + weight file, torch.hub entry points.

A shared model is a folder with ``config.json`` (timm's format: ``architecture``, ``num_classes``,
``model_args`` with every architecture keyword needed to rebuild it, ``pretrained_cfg`` with the
preprocessing) and ``model.safetensors``. timm reads it as ``timm.create_model("local-dir:FOLDER")`` or, once
uploaded, ``timm.create_model("hf-hub:USER/REPO")``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import timm
import torch.nn as nn
from timm.layers import DropPath
from timm.models._hub import save_config_for_hf

from .checkpoint import read_state_dict, save_weights
from .model_files import check_hub_folder
from .models import MODEL_NAMES, RELEASED_MODEL_NAMES

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "described_checkpoint", "hub_entry_point", "load_model", "load_pretrained",
           "model_from_checkpoint", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _architecture_of(model: nn.Module, architecture: str | None, model_args: Mapping | None) -> tuple[str, dict]:
    """The registered model name and keyword arguments that rebuild ``model``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = architecture or cfg.get("architecture")
    if architecture is None:
        raise ValueError(
            f"model: cannot tell which registered architecture this {type(model).__name__} is (it was not built by "
            f"timm.create_model); pass architecture= (one of {MODEL_NAMES}) and model_args= (its keyword arguments)"
        )
    if architecture not in MODEL_NAMES:
        raise ValueError(f"architecture: expected one of {MODEL_NAMES}, got {architecture!r}")
    # Our entry points (and timm.create_model since timm 1.0.31) record the keyword arguments they were given
    # as model._model_args; explicit ones win.
    args = dict(getattr(model, "_model_args", {}) or {})
    args.update(model_args or {})
    args.pop("pretrained_model_args", None)
    for key in [key for key in args if key.endswith("drop_rate") or key == "drop_path_rate"]:
        del args[key]  # training-only, as timm's own export leaves them out
    args["num_classes"] = model.num_classes
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    if isinstance(pool, str):
        args["global_pool"] = pool  # reset_classifier(n, pool) may have changed it after construction
    return architecture, args


def _signature(model: nn.Module) -> list[str]:
    """What must agree for two models to be the same network: parameter and buffer shapes, and every module's
    hyper-parameters (``extra_repr``) except training-only dropout."""
    lines = [f"{key}: {tuple(value.shape)}" for key, value in model.state_dict().items()]
    for name, module in model.named_modules():
        if not isinstance(module, (DropPath, nn.Dropout, nn.Identity)) and module.extra_repr():
            lines.append(f"{name or 'model'} ({type(module).__name__}): {module.extra_repr()}")
    return lines


def _rebuild_and_compare(model: nn.Module, architecture: str, model_args: dict) -> nn.Module:
    """Build ``architecture(**model_args)`` and check it is the same network as ``model``."""
    try:
        rebuilt = timm.create_model(architecture, **model_args)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise ValueError(f"model_args: {architecture}(**{model_args}) cannot be built: {error}") from error
    mine, theirs = _signature(model), _signature(rebuilt)
    differences = [f"{a!r} vs rebuilt {b!r}" for a, b in zip(mine, theirs) if a != b]
    if differences or len(mine) != len(theirs):
        raise ValueError(
            f"model_args: {architecture}(**{model_args}) does not rebuild this model (pass the missing architecture "
            f"arguments as model_args=); first differences: " + "; ".join(differences[:3])
        )
    return rebuilt


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    architecture: str | None = None,
    model_args: Mapping | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a folder in the Hugging Face Hub layout: ``config.json`` + ``model.safetensors``.

    The architecture and its keyword arguments come from ``timm.create_model`` (which records them) or from
    ``architecture`` / ``model_args``; before anything is written the model is rebuilt from them and
    compared with ``model`` (shapes and every layer's hyper-parameters), so a folder that would load into a
    different network is never written. Drop rates are not saved (training-only).

    Args:
        model: a BiFormer built by ``timm.create_model`` (or directly, with ``architecture``/``model_args``).
        directory: the folder (created with its parents if missing).
        architecture: registered name (``"biformer_tiny"`` ...), default ``model.pretrained_cfg["architecture"]``.
        model_args: keyword arguments of that factory, added to the recorded ones.
        label_names: class names, stored in ``config.json``.
        overwrite: replace an existing ``config.json`` / ``model.safetensors`` in ``directory``.

    Returns:
        the folder. Load it with :func:`load_pretrained` or ``timm.create_model("local-dir:FOLDER",
        pretrained=True)``; upload it with ``huggingface_hub.upload_folder``.

    Raises:
        ValueError: the architecture cannot be determined or ``model_args`` does not rebuild ``model``.
        FileExistsError: the folder already holds a model and ``overwrite`` is False.
        NotADirectoryError: ``directory`` is a file.
    """
    directory = Path(directory)
    architecture, args = _architecture_of(model, architecture, model_args)
    rebuilt = _rebuild_and_compare(model, architecture, args)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: {directory} exists and is not a folder")
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"directory: {directory} already holds {existing}; pass overwrite=True to replace them")
    directory.mkdir(parents=True, exist_ok=True)
    described = model if getattr(model, "pretrained_cfg", None) else rebuilt
    model_config = {"label_names": list(label_names)} if label_names else None
    temporary = directory / (CONFIG_NAME + ".tmp")
    save_config_for_hf(described, temporary, model_config=model_config, model_args=args)
    _drop_head_size_from_model_args(temporary)
    save_weights(model, directory / WEIGHTS_NAME)
    os.replace(temporary, directory / CONFIG_NAME)  # the config last: a folder with a config is complete
    return directory


def _drop_head_size_from_model_args(config_path: Path) -> None:
    """Keep ``num_classes`` only at the top of ``config.json``: Hugging Face transformers' timm wrapper passes
    ``model_args`` to ``timm.create_model`` together with its own ``num_classes`` (a duplicate raises ``TypeError``),
    and timm takes the head size from the top-level value when ``model_args`` lacks it."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("model_args"), dict) and "num_classes" in config["model_args"]:
        del config["model_args"]["num_classes"]
        config_path.write_text(json.dumps(config, indent=2))


def _read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained folder: no such directory: {directory}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"pretrained folder {directory}: no {CONFIG_NAME} (expected the Hugging Face Hub layout: "
            f"{CONFIG_NAME} + {WEIGHTS_NAME}, as written by biformer.hub.save_pretrained)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"pretrained folder {directory}: {CONFIG_NAME} is not valid JSON ({error})") from error
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if architecture not in MODEL_NAMES:
        raise ValueError(
            f"pretrained folder {directory}: {CONFIG_NAME} names architecture {architecture!r}, "
            f"expected one of {MODEL_NAMES}"
        )
    return config


def load_pretrained(directory: str | os.PathLike, **kwargs: object) -> nn.Module:
    """Load a folder written by :func:`save_pretrained` (or downloaded from the Hub), through timm.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``num_classes=5`` replaces the head, ``drop_path_rate=0.1``
    for fine-tuning). Equivalent to ``timm.create_model("local-dir:FOLDER", pretrained=True, **kwargs)`` with
    clear errors.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it.
        ValueError: the config is not JSON or not a BiFormer's, or the weights are missing, unreadable or do
            not fit.
    """
    directory = Path(directory)
    config = _read_config(directory)
    check_hub_folder(directory, config, kwargs)  # before anything is built: architecture arguments, shapes
    try:
        return timm.create_model(f"local-dir:{directory}", pretrained=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - timm/safetensors/torch failures all mean "these weights do not load"
        raise ValueError(
            f"pretrained folder {directory}: cannot load the weights ({type(error).__name__}: {error})"
        ) from error


def _load_weight_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    state_dict = read_state_dict(path)
    head = state_dict.get("head.weight")
    file_classes = head.shape[0] if head is not None else 0  # no head: saved with num_classes=0
    num_classes = kwargs.pop("num_classes", file_classes)  # another value: timm starts a fresh head
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes,
            pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=file_classes), **kwargs,
        )
    except RuntimeError as error:  # torch's load_state_dict: missing / unexpected keys, shapes
        raise ValueError(f"checkpoint {path} does not fit {name}: {error}") from error
    model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    return model


def load_model(model: str | None = None, checkpoint: str | os.PathLike | None = None, **kwargs: object) -> nn.Module:
    """A BiFormer from a model name and/or weights, the way the ``biformer`` commands take them.

    Args:
        model: a registered name (``"biformer_tiny"`` ...) or a folder in the Hub layout; default: the
            architecture of ``checkpoint`` when it is a folder, else ``"biformer_tiny"``.
        checkpoint: weights: the authors' ``.pth``, a ``.safetensors`` / ``torch.save`` file (the head size is
            taken from the file), or a Hub-layout folder; ``None`` for random weights.
        kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: unknown model name, a folder of another architecture than ``model``, weights that do not
            fit; FileNotFoundError: missing file or folder.
    """
    if model is not None and Path(model).is_dir():
        if checkpoint is not None:
            raise ValueError(f"checkpoint: {model} is already a model folder; got another checkpoint {checkpoint}")
        model, checkpoint = None, model
    if checkpoint is not None and Path(checkpoint).is_dir():
        architecture = _read_config(Path(checkpoint))["architecture"]
        if model is not None and model != architecture:
            raise ValueError(f"model: {model!r} given, but the folder {checkpoint} holds a {architecture!r}")
        return load_pretrained(checkpoint, **kwargs)
    if checkpoint is not None and described_checkpoint(checkpoint):
        # a training checkpoint: its own description rebuilds the exact model (model_kwargs, channels, head)
        return model_from_checkpoint(checkpoint, model, **kwargs)
    model = model or "biformer_tiny"
    if model not in MODEL_NAMES:
        raise ValueError(f"model: expected one of {MODEL_NAMES} or a model folder, got {model!r}")
    if checkpoint is None:
        return timm.create_model(model, **kwargs)
    return _load_weight_file(model, Path(checkpoint), dict(kwargs))


def model_from_checkpoint(checkpoint: str | os.PathLike, model_name: str | None = None,
                          **kwargs: object) -> nn.Module:
    """The model a checkpoint the project writes holds, built and loaded (eval mode, on CPU).

    Args:
        checkpoint: a training checkpoint (``RUN/checkpoints/*.safetensors``: its configuration rebuilds the
            exact network, ``model_kwargs`` included), a Hub-layout folder, or another weights file (the
            authors' ``.pth``, a plain ``.safetensors``; then ``model_name`` names the architecture).
        model_name: the registered model name; for a training checkpoint or a folder it must match the stored
            one when given.
        kwargs: passed to ``timm.create_model`` for folders and plain weights files (``num_classes`` ...).

    The returned model's ``pretrained_cfg`` holds the checkpoint's preprocessing (input size, mean, std,
    interpolation, crop), so an export or a routing picture uses the size the model was trained at.

    Raises:
        FileNotFoundError, ValueError: missing, unreadable, or a description that does not fit its weights.
    """
    path = Path(checkpoint)
    if described_checkpoint(path):
        from .train.inference import load_for_inference

        if kwargs:
            raise ValueError(f"checkpoint: {path} describes its own model; the options {sorted(kwargs)} cannot "
                             f"change it")
        loaded = load_for_inference(path, model_name)
        info = loaded.info
        model = loaded.model
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        cfg.update(input_size=(info["in_chans"], info["input_size"], info["input_size"]), mean=tuple(info["mean"]),
                   std=tuple(info["std"]), interpolation=info["interpolation"], crop_pct=info["crop_pct"],
                   architecture=loaded.config.model)
        model.pretrained_cfg = cfg
        return model
    return load_model(model_name, path, **kwargs)


def described_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a weights file carrying our training description (metadata ``biformer``)."""
    from .train.checkpoints import read_metadata

    return Path(path).is_file() and read_metadata(path) is not None


def hub_entry_point(name: str) -> Callable[..., nn.Module]:
    """The ``torch.hub`` entry point for model ``name`` (used by the repository's ``hubconf.py``)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")

    def entry_point(pretrained: bool = False, weights: str | os.PathLike | None = None, **kwargs: object) -> nn.Module:
        if weights is not None:
            return load_model(name, weights, **kwargs)
        if pretrained and name not in RELEASED_MODEL_NAMES:
            raise ValueError(
                f"pretrained: {name} has no released weights; pass weights=PATH (a .pth or .safetensors file "
                f"or a Hub-layout folder)"
            )
        if pretrained:
            raise ValueError(
                f"pretrained: the authors' download links for {name} are broken, so nothing can be downloaded; "
                f"pass weights=PATH (their .pth file, a .safetensors file or a Hub-layout folder)"
            )
        return timm.create_model(name, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f"{name} (random weights), or with ``weights=PATH``: the authors' .pth file, a .safetensors file or a\n"
        f"folder in the Hugging Face Hub layout. Other keyword arguments go to timm.create_model\n"
        f"(num_classes=..., drop_path_rate=...). pretrained=True alone raises: the authors' links are broken\n"
        f"(and biformer_nano has no released weights)."
    )
    return entry_point
