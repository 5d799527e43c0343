"""Checkpoints of a run: weights as safetensors (with a description of the model) plus one training-state file.

Files in ``RUN/checkpoints/``:

- ``last.safetensors``: the model's weights after the latest epoch; ``last-ema.safetensors``: the EMA weights
  (when ``model_ema``); ``best.safetensors``: the weights that reached the best main metric (EMA ones when
  the EMA is evaluated). Each carries the metadata entry ``biformer``: JSON with the run's configuration
  and the data description (class names, channels, input size, normalisation), so ``biformer eval`` and
  ``biformer predict`` rebuild model and preprocessing from the file alone.
- ``training-state.pt``: everything ``--resume`` needs (model, optimizer, scheduler, EMA, epoch, step, best
  metric, metric history), in one file so it is always consistent with itself; it holds only tensors and
  plain containers and is read with ``torch.load(weights_only=True)``.

Every write goes to a temporary file in the same folder that is then renamed over the target
(``os.replace`` is atomic), so a crash during a save leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import read_state_dict

__all__ = ["METADATA_KEY", "atomic_write", "load_training_state", "read_metadata", "save_training_state",
           "save_weights_with_metadata"]

METADATA_KEY = "biformer"
STATE_FILE = "training-state.pt"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def save_weights_with_metadata(model: nn.Module, path: str | os.PathLike, description: dict[str, Any]) -> Path:
    """Write ``model``'s state_dict as safetensors with ``description`` (JSON) under metadata ``biformer``."""
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(description)}
    return atomic_write(path, lambda temporary: save_file(state_dict, str(temporary), metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``biformer`` description stored in a safetensors file by this library; None for other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    read_state_dict(path)  # clear errors for a missing or corrupted file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {path}: unreadable '{METADATA_KEY}' metadata ({error})") from error


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` the training state (tensors and plain containers only)."""
    return atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable (truncated, corrupted, not a training state).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise ValueError(f"resume: cannot read {path} ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError(f"resume: {path} is not a training state (expected a dict with 'model' and 'epoch')")
    return state
