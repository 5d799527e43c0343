"""Reading and writing weight files without unpickling arbitrary objects.

Formats read: safetensors, and ``torch.save`` files (the authors' ``{"model": state_dict, ...}``, a
``{"state_dict": ...}`` dict or a bare state_dict) loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .files import atomic_write

__all__ = ["load_checkpoint", "read_state_dict", "save_weights", "shape_mismatches", "unwrap_state_dict"]

_WRAPPER_KEYS = ("model", "state_dict")


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint object.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips ``module.`` prefixes
    (DistributedDataParallel) and drops non-tensor entries.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint: expected a dict of tensors, got {type(checkpoint).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str):
            raise ValueError(f"checkpoint: keys must be strings (parameter names), got {key!r} "
                             f"({type(key).__name__})")
        if isinstance(value, torch.Tensor):
            state_dict[key.removeprefix("module.")] = value
    if not state_dict:
        raise ValueError("checkpoint: no tensors found (expected a state_dict, or one under 'model')")
    return state_dict


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save`` file, safely.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (truncated, corrupted, not weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        if file_format(path) == "safetensors":
            checkpoint = load_file(str(path), device="cpu")
        else:
            # argparse.Namespace is allowed because the authors' training checkpoints store their args.
            # An open file, not the name: torch.load hands a name ending in .safetensors to safetensors.
            with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as handle:
                checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure means the same thing to the user
        if type(error).__name__ == "UnpicklingError":  # the weights_only reader's refusal (pickle is not imported)
            # torch's text is several lines and advises weights_only=False; keep only what the reader refused
            found = re.search(r"GLOBAL (\S+)|WeightsUnpickler error:\s*(.+)", str(error))
            detail = next((group for group in found.groups() if group), "") if found else str(error).strip()[:200]
            detail = (detail.splitlines() or ["refused"])[0]
            raise ValueError(
                f"checkpoint: cannot read {path} as weights: the safe reader refused it ({detail}); "
                f"it is not a torch.save file, or it holds Python objects other than tensors, whose loading could "
                f"run code"
            ) from error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"checkpoint: cannot read {path} as weights ({type(error).__name__}: {reason})") from error
    return unwrap_state_dict(checkpoint)


def file_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"torch"``, from the file's first bytes (not its name): a safetensors file starts
    with an 8-byte header length followed by ``{``; anything else is read as a ``torch.save`` file."""
    with open(path, "rb") as handle:
        start = handle.read(9)
    return "safetensors" if len(start) == 9 and start[8:9] == b"{" else "torch"


def shape_mismatches(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], target: str) -> list[str]:
    """``"KEY: file (shape) vs TARGET (shape)"`` for every key both hold with different shapes."""
    return [
        f"{key}: file {tuple(value.shape)} vs {target} {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> NamedTuple:
    """Load weights from ``path`` into ``model`` (see :func:`read_state_dict` for formats).

    Returns torch's ``(missing_keys, unexpected_keys)`` named tuple.

    Raises:
        ValueError: with ``strict``, when keys are missing or unexpected, or shapes differ; the message
            lists them.
    """
    state_dict = read_state_dict(path)
    mismatched = shape_mismatches(state_dict, model.state_dict(), "model")
    if mismatched:
        raise ValueError(f"checkpoint {path}: shapes differ from the model: " + "; ".join(mismatched[:10]))
    result = model.load_state_dict(state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"checkpoint {path} does not match {type(model).__name__}: "
            f"missing keys {result.missing_keys[:10]}{' ...' if len(result.missing_keys) > 10 else ''}, "
            f"unexpected keys {result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )
    return result


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights: safetensors for a ``.safetensors`` path, else the authors' format
    (``torch.save({"model": state_dict})``).

    The file is written to a temporary name, flushed and renamed (:func:`biformer.files.atomic_write`), so an
    interrupted or failed save never leaves a truncated file at ``path``; a failed write (disk full, no
    permission) raises :class:`biformer.files.WriteError` naming ``path`` and keeps its previous version.
    """
    path = Path(path)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}

    def write(temporary: Path) -> None:
        if path.suffix == ".safetensors":
            temporary.write_bytes(safetensors_bytes(state_dict))  # Python I/O: a failed write raises OSError
        else:
            with open(temporary, "wb") as handle:
                torch.save({"model": state_dict}, handle)

    return atomic_write(path, write)
