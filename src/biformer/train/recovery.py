"""Resuming inside an epoch: the epoch's data order and every random draw are functions of where training is.

What makes a run killed at any optimizer step resume bit-identically (same number of processes):

- :class:`EpochSampler` gives each process its share of the epoch's shuffled indices (a permutation seeded by
  ``(seed, epoch)``, optionally with repeated augmentation) and can start at any position of that share.
- Each index travels with its own seed ``(seed, epoch, rank, position)``; :class:`SeededSamples` seeds
  Python's, NumPy's and torch's generators from it before loading and augmenting that image (in the
  data-loading worker or in the training process). An image's crop,
  flip, RandAugment and erasing depend on nothing else: not on the worker that loads it, not on what was
  loaded before.
- The engine re-seeds the training process's generators before every micro-batch from
  ``(seed, epoch, micro-batch, rank)`` (mixup/cutmix, stochastic depth).
- A recovery checkpoint (:func:`recovery_path`) holds the model, optimizer, scheduler, EMA, gradient scaler,
  the position in the epoch and each process's running loss sums; it is written only between optimizer steps
  (no half-accumulated gradients).

Recovery checkpoints sit beside ``training-state.pt`` as ``recovery-STEP.pt``. Each is written atomically;
older ones are removed only after a newer one is complete, and at most ``keep`` are kept. The state saved at
the end of an epoch (``training-state.pt``) supersedes them: they are removed once it is written.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["EpochSampler", "SeededSamples", "prune_recovery_files", "recovery_files", "recovery_path",
           "sample_seed"]

_RECOVERY = re.compile(r"^recovery-(\d+)\.pt$")


_MASK64 = (1 << 64) - 1


def sample_seed(parts: tuple[int, ...]) -> int:
    """A 32-bit seed from a tuple of integers: SplitMix64 steps over the parts (well mixed, platform
    independent, about a microsecond: it runs once per image)."""
    state = 0
    for part in parts:
        state = (state + (part & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        mixed = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = mixed ^ (mixed >> 31)
    return state >> 32


class EpochSampler(Sampler[tuple[int, tuple[int, ...]]]):
    """This process's share of an epoch: ``(index, seed parts)`` pairs, from position ``start`` on.

    The epoch's order is a permutation of the dataset seeded by ``(seed, epoch)``, the same on every process.
    With ``repeats`` r > 1 (repeated augmentation, as in DeiT's RASampler) every index appears r times in a row
    of that order, so its copies land on different processes (differently augmented); each process then
    keeps ``len(dataset) // world_size`` samples, so an epoch still has about ``len(dataset)`` images. Without
    repetition the order is padded (by repeating its start) to a multiple of ``world_size``, as torch's
    DistributedSampler does.

    Args:
        size: dataset length.
        rank, world_size: this process and the number of processes.
        seed: the run's seed.
        repeats: repeated-augmentation count (1: off).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, repeats: int = 1) -> None:
        self.size, self.rank, self.world_size, self.seed, self.repeats = size, rank, world_size, seed, repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, beginning at position ``start`` of this process's share."""
        self.epoch, self.start = epoch, start

    def share(self) -> list[int]:
        """This process's indices for the current epoch, in order (all of them, ``start`` ignored)."""
        generator = torch.Generator().manual_seed(sample_seed((self.seed, self.epoch)))
        order = torch.randperm(self.size, generator=generator)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
            per_process = self.size // self.world_size
        else:
            per_process = math.ceil(self.size / self.world_size)
        total = per_process * self.world_size
        if len(order) < total:
            order = torch.cat([order, order[: total - len(order)]])
        return order[self.rank : total : self.world_size][:per_process].tolist()

    @property
    def per_process(self) -> int:
        """Samples per process and epoch."""
        return self.size // self.world_size if self.repeats > 1 else math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        share = self.share()
        for position in range(self.start, len(share)):
            yield share[position], (self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(self.per_process - self.start, 0)


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with Python's, NumPy's and torch's global generators seeded from the sample's
    own seed.

    Keys are ``(index, seed_parts)`` pairs from :class:`EpochSampler` (a plain index is passed through
    unseeded). With ``workers=0`` this runs in the training process and leaves its generators seeded by the
    last image: the engine re-seeds them before every micro-batch anyway, and saving and restoring NumPy's
    state per image would cost more than loading a small image (``restore=True`` does it, for other uses).
    """

    def __init__(self, dataset: Dataset, restore: bool = False) -> None:
        self.dataset = dataset
        self.restore = restore

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, parts = key
        seed = sample_seed(parts)
        in_worker = get_worker_info() is not None
        saved = None
        if self.restore and not in_worker:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def recovery_path(folder: str | Path, step: int) -> Path:
    """The recovery checkpoint of optimizer step ``step``."""
    return Path(folder) / f"recovery-{step:09d}.pt"


def recovery_files(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the recovery checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _RECOVERY.match(path.name))]
    return sorted(found)


def prune_recovery_files(folder: str | Path, keep: int, up_to_step: int | None = None) -> list[Path]:
    """Remove all but the newest ``keep`` recovery checkpoints (all those of steps <= ``up_to_step`` when
    given, e.g. after an end-of-epoch state supersedes them); returns the removed paths."""
    files = recovery_files(folder)
    doomed = [path for step, path in files if up_to_step is not None and step <= up_to_step]
    remaining = [path for step, path in files if path not in doomed]
    doomed += remaining[: max(len(remaining) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
