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

Every write goes through :func:`biformer.files.atomic_write` (temporary file, flush, rename), so a crash
during a save (a kill, a full disk) leaves the previous file intact; a write that fails raises
:class:`~biformer.files.WriteError` naming the file. Temporary files left by a killed process are removed
when the run continues (:func:`~biformer.files.remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..checkpoint import file_format, read_state_dict
from ..files import WriteError, atomic_write, check_writable_folder, make_folder, remove_stale_temporaries

__all__ = ["METADATA_KEY", "WriteError", "atomic_write", "check_writable_folder", "load_training_state",
           "make_folder", "read_metadata", "remove_stale_temporaries", "save_training_state",
           "save_weights_with_metadata"]

METADATA_KEY = "biformer"
STATE_FILE = "training-state.pt"


def save_weights_with_metadata(model: nn.Module, path: str | os.PathLike, description: dict[str, Any]) -> Path:
    """Write ``model``'s state_dict as safetensors with ``description`` (JSON) under metadata ``biformer``."""
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    data = safetensors_bytes(state_dict, metadata={METADATA_KEY: json.dumps(description)})
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))  # Python I/O: OSError on failure


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``biformer`` description stored in a safetensors file by this library; None for other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    read_state_dict(path)  # clear errors for a missing or corrupted file
    if file_format(path) != "safetensors":  # a torch.save file named .safetensors carries no description
        return None
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

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a Python file: a failed write keeps its OSError (errno)
            torch.save(state, handle)

    return atomic_write(path, write)


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
