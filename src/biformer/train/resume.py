"""What may change when a run continues (``biformer train --resume RUN``).

A resumed run restores its model, optimizer, schedule and EMA, so most options cannot take a new value: the
optimizer state would bring the old learning rate and weight decay back, another model or dataset would not
fit the weights, another ``output``/``name`` would record a folder the run does not write to. Every option
given on resume either applies (:data:`RESUMABLE`) or, when its value differs from the run's, is refused in
one line naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["RESUMABLE", "check_resume_values"]

# Options a resumed run applies: they change how it continues, not what it has learnt so far.
RESUMABLE = frozenset({
    "epochs",  # the schedule is recomputed for the new length
    "time_limit", "eval_every", "progress", "workers", "threads", "device", "bad_images", "max_bad_images",
    "data_dir", "download",
    # checkpoints, logs and loader mechanics: how the run is saved and watched, not what it learns
    "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "pin_memory", "persistent_workers",
    "prefetch_factor", "tensorboard", "wandb", "log_every",
})


def check_resume_values(stored: Mapping[str, Any], given: Mapping[str, Any], run: str) -> None:
    """Refuse options in ``given`` whose value differs from the run's ``stored`` one and cannot change.

    Args:
        stored: the run's configuration (its ``config.yaml``, or the training state's copy).
        given: the values given now (flags, a ``--config`` file).
        run: the run folder, for the message.

    Raises:
        ConfigError: naming every such option with both values.
    """
    changed = {name: value for name, value in given.items()
               if name not in RESUMABLE and name in stored and stored[name] != value}
    if changed:
        listed = ", ".join(f"{name} {stored[name]!r} -> {value!r}" for name, value in sorted(changed.items()))
        raise ConfigError(
            f"--resume: {sorted(changed)} cannot change when the run {run} continues ({listed}); the run keeps its "
            f"model, data, optimizer and schedule. Start a new run for other values; on resume only "
            f"{sorted(RESUMABLE)} may change"
        )
