"""Live logs of a run: TensorBoard event files (``RUN/tensorboard``) and, optionally, Weights & Biases offline.

Logged (main process only): every ``log_every`` optimizer steps ``train/loss`` (mean over those steps),
``train/lr``, ``train/images_per_s`` (all processes) and, with fp16, ``train/loss_scale`` and
``train/skipped_steps``; after every evaluation each scalar metric as ``eval/NAME`` (``eval/ema_NAME`` for the
EMA) and the epoch's ``epoch/train_loss`` and ``epoch/images_per_s``. The x axis is the optimizer step.

TensorBoard comes with ``torch.utils.tensorboard`` and the ``tensorboard`` package (the ``tensorboard``
extra: ``pip install 'biformer[tensorboard]'``); without it the run prints one line and goes on. W&B
(``--wandb``, the ``wandb`` extra) runs in offline mode: files under ``RUN/wandb``, uploaded later with
``wandb sync`` if you want; asking for it without the package installed is an error before training starts.
After ``--resume`` TensorBoard drops the events logged after the resumed step (``purge_step``), so curves
never run twice over the same steps.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["RunLogs", "check_wandb_installed"]

TENSORBOARD_EXTRA = "pip install 'biformer[tensorboard]'"
WANDB_EXTRA = "pip install 'biformer[wandb]'"


def _summary_writer_class() -> Any | None:
    try:
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except ImportError:  # torch.utils.tensorboard raises ImportError when the tensorboard package is missing
        return None


def check_wandb_installed() -> Any:
    """The ``wandb`` module; a :class:`~biformer.train.config.ConfigError` naming the extra when missing."""
    from .config import ConfigError

    try:
        return importlib.import_module("wandb")
    except ImportError as error:
        raise ConfigError(f"option 'wandb': the wandb package is not installed ({WANDB_EXTRA}), or drop --wandb") \
            from error


class RunLogs:
    """The run's TensorBoard writer and W&B run (either may be off); all methods do nothing when both are.

    Args:
        run_dir: the run folder.
        config: the run's configuration as a dict (shown by W&B).
        tensorboard: write ``run_dir/tensorboard``.
        wandb: log to W&B in offline mode under ``run_dir/wandb``.
        start_step: the step training continues from (TensorBoard purges later events; 0 for a new run).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], tensorboard: bool = True, wandb: bool = False,
                 start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.notes: list[str] = []  # lines for the user: where to look, or why a log is off
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            writer_class = _summary_writer_class()
            if writer_class is None:
                self.notes.append(f"TensorBoard logs off: the tensorboard package is not installed "
                                  f"({TENSORBOARD_EXTRA})")
            else:
                folder = self.run_dir / "tensorboard"
                self.writer = writer_class(log_dir=str(folder), purge_step=start_step or None)
                self.notes.append(f"live logs: tensorboard --logdir {folder}")
        if wandb:
            module = check_wandb_installed()
            folder = self.run_dir / "wandb"
            folder.mkdir(parents=True, exist_ok=True)
            self.wandb_run = module.init(mode="offline", dir=str(self.run_dir), project="biformer",
                                         name=self.run_dir.name, config=config, resume="allow",
                                         id=self.run_dir.name.replace("/", "-"))
            self.notes.append(f"W&B offline run in {folder} (upload with: wandb sync {folder}/offline-run-*)")

    @property
    def enabled(self) -> bool:
        return self.writer is not None or self.wandb_run is not None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{tag: value}`` at optimizer step ``step`` (non-numbers are left out)."""
        numbers = {tag: float(value) for tag, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None and numbers:
            self.wandb_run.log(numbers, step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
