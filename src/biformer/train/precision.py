"""Numeric precision of training and evaluation: fp32, bf16 autocast, fp16 autocast with a gradient scaler.

- ``fp32``: no autocast.
- ``bf16``: ``torch.autocast`` with bfloat16 (CPU and CUDA); bf16 has fp32's range, so no scaler is needed.
- ``fp16``: ``torch.autocast`` with float16 and :class:`torch.amp.GradScaler`: the loss is multiplied by a
  scale before ``backward``; before the optimizer step the gradients are unscaled and checked; a step whose
  gradients hold an inf or NaN is skipped (the weights and the optimizer state stay as they were) and the
  scale is halved; after ``growth_interval`` good steps it doubles. This is what GPUs without fast bf16
  (V100, T4, ...) need. The scaler also runs on CPU (torch >= 2.3), where fp16 matmuls are slow: CPU runs use
  it for tests, not for speed.

:class:`StepGuard` wraps the scaler for the engine and counts skipped steps; many skipped steps in a row
mean the model diverged rather than overflowed, and stop the run with a message.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["MAX_SKIPPED_IN_A_ROW", "StepGuard", "autocast"]

# fp16: a run stops after this many consecutive skipped steps (the loss scale has then fallen by 2 ** 30)
MAX_SKIPPED_IN_A_ROW = 30
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bf16 or fp16 for ``precision`` ``"bf16"`` / ``"fp16"``; nothing for fp32."""
    if precision in _DTYPES:
        return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()


class StepGuard:
    """Backward and optimizer step through a :class:`torch.amp.GradScaler` (enabled for fp16 only).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the training device (the scaler's device type).

    Attributes:
        skipped: steps skipped because of non-finite gradients, in total (saved with the training state).
        skipped_in_a_row: the current run of consecutive skipped steps.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)
        self.skipped = 0
        self.skipped_in_a_row = 0

    def backward(self, loss: torch.Tensor) -> None:
        """``backward`` of the (scaled, for fp16) scalar ``loss``."""
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping them); nothing without the scaler."""
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step, unless the gradients are not finite (fp16); returns whether it was taken.

        Raises:
            FloatingPointError: :data:`MAX_SKIPPED_IN_A_ROW` steps in a row were skipped.
        """
        if not self.enabled:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= scale_before  # the scaler halves the scale after an inf/NaN step
        if taken:
            self.skipped_in_a_row = 0
            return True
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"precision fp16: {self.skipped_in_a_row} optimizer steps in a row had inf/NaN gradients (loss "
                f"scale now {self.scaler.get_scale():.3g}): the model diverged; lower --lr, enable --clip-grad or "
                f"use --precision bf16 / fp32"
            )
        return False

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without the scaler)."""
        return float(self.scaler.get_scale()) if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        return dict(scaler=self.scaler.state_dict(), skipped=self.skipped, skipped_in_a_row=self.skipped_in_a_row)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if self.enabled and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))

