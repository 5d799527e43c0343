"""The generic training loop: any :class:`~biformer.train.task.Task`, one process or many (torchrun).

Recipe pieces come from timm: the optimizer (``create_optimizer_v2``: AdamW, no weight decay on biases,
norms and ``model.no_weight_decay()``), the schedule (``create_scheduler_v2``: cosine with linear warm-up,
updated every optimizer step), the weight EMA (``ModelEmaV3``) and gradient clipping
(``dispatch_clip_grad``). The learning rate is ``lr_base * global batch / lr_base_size`` unless ``lr`` is
given, with global batch = ``batch_size * processes * accum_steps``.

Exact resumption, also inside an epoch: the epoch's data order is a permutation seeded by ``(seed, epoch)``,
each image is augmented with generators seeded by its place in the epoch, and the training process's
generators are re-seeded before every micro-batch (mixup, stochastic depth): see
:mod:`biformer.train.recovery`. Besides the state saved at the end of every epoch, recovery checkpoints are
saved inside epochs (``checkpoint_every`` steps, or every ``checkpoint_minutes``); ``--resume`` continues from
the newest complete one and ends with the same weights as an uninterrupted run (same seed, same number of
processes).

Time budget: with ``time_limit`` (minutes, wall clock from the start of training, evaluations included) the
learning-rate schedule runs over the budget instead of the planned steps: at a fraction ``f`` of the budget
the rate is the one the schedule gives after ``f`` of the planned epochs (``epochs`` is then an upper bound).
When the budget is spent, training stops after the current step, the partial epoch counts as done, and the
model is evaluated and saved as at the end of an epoch (``metrics.json`` says ``stopped_by_time_limit``).
Such a run depends on the machine's speed, so ``--resume`` continues it but does not reproduce it exactly.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from .._optional import require
from ..checkpoint import shape_mismatches
from ..files import check_writable_folder, make_folder, remove_stale_temporaries
from ..locks import RunLock
from .checkpoints import STATE_FILE, load_training_state, save_training_state, save_weights_with_metadata
from .config import ConfigError, TrainConfig, save_config
from .data import SkipUnreadable
from .distributed import Distributed, convert_sync_batchnorm, setup
from .history import plot_history, write_history
from .logs import RunLogs, check_wandb_installed
from .precision import StepGuard, autocast
from .recovery import EpochSampler, SeededSamples, prune_recovery_files, recovery_files, recovery_path
from .resume import check_resume_values
from .task import MetricSums, Task, TaskData, get_task

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["ShardSampler", "Trainer", "evaluate", "gather_objects", "lr_for", "move_to", "seed_everything"]


def _tqdm() -> type[tqdm]:
    """tqdm's progress bar class, imported on first use (the ``cli`` extra)."""
    return require("tqdm", extra="cli", purpose="the progress display").tqdm


def seed_everything(*parts: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from a tuple of integers."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in tuples, lists, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: each sample evaluated exactly once over all ranks
    (torch's DistributedSampler pads with repeated samples, which would bias the metrics)."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def gather_objects(dist: Distributed) -> Callable[[Any], list[Any]]:
    """A function ``value -> [every process's value]`` (rank order; ``all_gather_object``), for
    :meth:`MetricSums.gather`; ``[value]`` in one process."""

    def gather(value: Any) -> list[Any]:
        if not dist.enabled:
            return [value]
        values: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    return gather


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    metrics: MetricSums,
    dist: Distributed,
    precision: str = "fp32",
    progress: bool = False,
    description: str = "eval",
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` into ``metrics``, sum the metric tensors over processes, gather the rest
    (:meth:`MetricSums.gather`), compute."""
    was_training = model.training
    model.eval()
    for batch in _tqdm()(loader, desc=description, leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(dist.device, precision):
            metrics.update(model, move_to(batch, dist.device))
    for tensor in metrics.sums():
        tensor.copy_(dist.all_reduce_sum(tensor.to(dist.device)).cpu())
    metrics.gather(gather_objects(dist))
    model.train(was_training)
    return metrics.compute()


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains ``config.task`` as ``config`` says; ``fit()`` runs it and returns the final summary.

    Args:
        config: the resolved configuration.
        resume: continue the run in ``run_dir`` from its ``checkpoints/training-state.pt``.
        run_dir: the run folder (default ``config.output / config.name``, the name made up when None).

    ``step_callbacks`` are called with the trainer after every optimizer step (``trainer.step`` counts
    them); tests use this to kill a run at a chosen point.
    """

    def __init__(self, config: TrainConfig, resume: bool = False, run_dir: str | Path | None = None) -> None:
        _tqdm()  # the optional packages training uses, before anything slow: one line naming the extra
        require("matplotlib", extra="cli", purpose="writing metrics.png")
        self.config = config
        self.dist = setup(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.task: Task = get_task(config)
        self.task.check_options()  # model name, model arguments, weights files: before the (slow) data loading
        self.run_dir = Path(run_dir) if run_dir else self._new_run_dir()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.step_callbacks: list[Callable[[Trainer], None]] = []
        self.resume = resume
        self._lock = RunLock(self.run_dir, "--resume" if resume else "--name")  # held by fit()
        self._check_run_dir()
        self._check_scale_options()
        check_writable_folder(self.run_dir, "--resume" if resume else "output")  # before the (slow) data loading
        resume_state = self._newest_state() if resume else None  # the training state is read before the data

        seed_everything(config.seed)  # the same initial weights on every rank
        self.data: TaskData = self.task.build_data(("train", "eval"))
        self.data.train, self.data.eval = (SkipUnreadable(dataset, config.bad_images, config.max_bad_images, split)
                                           for dataset, split in ((self.data.train, "train"), (self.data.eval, "eval")))
        self.unreadable: dict[str, list[int]] = {"train": [], "eval": []}  # indices found unreadable, per split
        self.model = self.task.build_model(self.data.info).to(self.dist.device)
        if config.sync_bn and self.dist.enabled:
            self.model, self.sync_bn_layers = convert_sync_batchnorm(self.model)
        self.train_loader, self.eval_loader = self._loaders()
        self.updates_per_epoch = len(self.train_loader) // config.accum_steps
        if self.updates_per_epoch < 1:
            raise ConfigError(
                f"option 'batch_size': {config.batch_size} x accum_steps {config.accum_steps} x "
                f"{self.dist.world_size} process(es) is more than the {len(self.data.train)} training samples"
            )
        self.global_batch = config.batch_size * self.dist.world_size * config.accum_steps
        self.lr = lr_for(config, self.dist.world_size)
        self.optimizer = create_optimizer_v2(self.model, opt=config.opt, lr=self.lr, weight_decay=config.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr, min_lr=config.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch, decay_rate=config.decay_rate,
            **({"decay_milestones": list(config.decay_milestones)} if config.decay_milestones else {}),
        )
        self.guard = StepGuard(config.precision, self.dist.device)
        self.ema = ModelEmaV3(self.model, decay=config.model_ema_decay) if config.model_ema else None
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Any] = {}
        self.time_budget = config.time_limit * 60 if config.time_limit else None  # seconds
        self.stopped_by_time_limit = False
        self._clock = (time.perf_counter(), 0.0)  # (start of this fit, seconds trained before it)
        # inside the current epoch: micro-batches done, this process's (loss sum, samples), seconds spent
        self.micro_done = 0
        self.epoch_sums = (0.0, 0.0)
        self.epoch_seconds = 0.0
        self.epoch_skipped = 0
        self.logs: RunLogs | None = None
        self._last_checkpoint = time.perf_counter()
        self.resumed_from: Path | None = None
        self._resumed_elapsed: float | None = None  # seconds trained before a recovery checkpoint
        if resume:
            self._load_state(resume_state)

    # --- setup ---------------------------------------------------------------------------------
    def _new_run_dir(self) -> Path:
        config = self.config
        name = config.name or f"{config.dataset}-{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
        return Path(config.output).expanduser() / str(self.dist.broadcast_object(name))

    def _check_run_dir(self) -> None:
        state = self.checkpoint_dir / STATE_FILE
        saved = state.is_file() or bool(recovery_files(self.checkpoint_dir))  # a recovery checkpoint is a state too
        if self.resume and not saved:
            raise FileNotFoundError(f"resume: no training state at {state} (nothing to resume)")
        if not self.resume and saved:
            raise FileExistsError(
                f"run folder {self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                "or choose another --name"
            )

    def _check_scale_options(self) -> None:
        """Options that depend on the device or on installed packages, checked before the data is read."""
        config = self.config
        if config.sync_bn and self.dist.device.type != "cuda":
            raise ConfigError(
                f"option 'sync_bn': SyncBatchNorm needs CUDA devices (torch has no CPU implementation), got "
                f"device {self.dist.device}; drop --sync-bn"
            )
        if config.sync_bn and not self.dist.enabled and self.dist.is_main:
            self._say("note: --sync-bn has no effect in one process (BatchNorm already sees the whole batch)")
        if config.wandb:
            check_wandb_installed()

    def _loaders(self) -> tuple[DataLoader, DataLoader]:
        config, dist, data = self.config, self.dist, self.data
        self.train_sampler = EpochSampler(len(data.train), dist.rank, dist.world_size, config.seed,
                                          config.repeated_aug)
        self.loader_generator = torch.Generator()
        common = dict(num_workers=config.workers, collate_fn=data.collate_fn,
                      pin_memory=config.pin_memory and dist.device.type == "cuda")
        if config.workers > 0:
            common.update(persistent_workers=config.persistent_workers)
            if config.prefetch_factor is not None:
                common.update(prefetch_factor=config.prefetch_factor)
        train = DataLoader(SeededSamples(data.train), batch_size=config.batch_size, sampler=self.train_sampler,
                           drop_last=True, generator=self.loader_generator, **common)
        evaluation = DataLoader(data.eval, batch_size=config.batch_size * 2,
                                sampler=ShardSampler(data.eval, dist.rank, dist.world_size), **common)
        return train, evaluation

    def _newest_state(self) -> tuple[dict[str, Any], Path]:
        """The training state of the latest step: the end-of-epoch state or a newer recovery checkpoint (an
        unreadable recovery checkpoint is passed over with a note: the one before it is used)."""
        state_path = self.checkpoint_dir / STATE_FILE
        state = load_training_state(state_path) if state_path.is_file() else None  # none before the first epoch ends
        for _step, path in reversed(recovery_files(self.checkpoint_dir)):
            try:
                recovery = load_training_state(path)
            except ValueError as error:
                if self.dist.is_main:
                    self._say(f"note: passing over an unreadable recovery checkpoint: {error}")
                continue
            if state is None or int(recovery["step"]) > int(state["step"]):
                return recovery, path
            break
        if state is None:
            raise ValueError(f"resume: no readable training state in {self.checkpoint_dir} (the recovery checkpoints "
                             f"are unreadable and no epoch was completed): start the run again")
        return state, state_path

    def _load_state(self, newest: tuple[dict[str, Any], Path] | None = None) -> None:
        state, path = newest if newest is not None else self._newest_state()
        self.resumed_from = path
        inside = state.get("inside_epoch")
        if inside is not None and int(inside["world_size"]) != self.dist.world_size:
            raise ValueError(
                f"resume: {path} was saved inside epoch {int(state['epoch']) + 1} by {inside['world_size']} "
                f"process(es); resume it with as many (got {self.dist.world_size}), or remove it to restart that "
                f"epoch from {self.checkpoint_dir / STATE_FILE}"
            )
        stored = {key: value for key, value in (state.get("config") or {}).items() if key not in ("output", "name")}
        check_resume_values(stored, self.config.to_dict(), str(self.run_dir))
        mismatched = shape_mismatches(state["model"], self.model.state_dict(), "the model built now")
        if mismatched:
            raise ValueError(f"resume: the run's weights do not fit the model built from its data now (did the "
                             f"dataset's classes or channels change?): {'; '.join(mismatched[:3])}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_epochs = state.get("config", {}).get("epochs")
        if saved_epochs == self.config.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.dist.is_main:
            self._say(f"note: epochs changed from {saved_epochs} to {self.config.epochs}: the learning-rate "
                      f"schedule is recomputed for {self.config.epochs} epochs")
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("resume: model_ema is on but the training state holds no EMA weights")
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.scheduler.step_update(num_updates=self.step)
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.history = list(state.get("history", []))
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.guard.load_state_dict(state.get("precision"))
        if inside is not None:
            self.micro_done = int(inside["micro_done"])
            self.epoch_sums = tuple(float(v) for v in inside["sums"][self.dist.rank])
            self.epoch_seconds = float(inside["seconds"])
            self.epoch_skipped = int(inside.get("skipped", 0))
            self._resumed_elapsed = float(inside["elapsed"])

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary also written to ``metrics.json``.

        The run folder is locked meanwhile (:class:`biformer.locks.RunLock`): a second process training the
        same folder is refused."""
        try:
            return self._fit()
        finally:
            self._lock.release()

    def _fit(self) -> dict[str, Any]:
        config = self.config
        if self.dist.is_main:
            make_folder(self.checkpoint_dir, "--resume" if self.resume else "output")
            self._lock.acquire()  # one process per run folder: a second --resume of it is refused
            self._check_run_dir()  # again under the lock: another run of this name may have saved meanwhile
            remove_stale_temporaries(self.checkpoint_dir)  # left by a process killed during a save
            remove_stale_temporaries(self.run_dir)
            save_config(config, self.run_dir / "config.yaml")
            self._say(f"run folder: {self.run_dir}")
            if self.resumed_from is not None and self.micro_done:
                self._say(f"resuming inside epoch {self.epoch + 1} after step {self.step} from {self.resumed_from}")
            self.logs = RunLogs(self.run_dir, config.to_dict(), config.tensorboard, config.wandb, self.step)
            for note in self.logs.notes:
                self._say(note)
            self._say(
                f"{config.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters), "
                f"{len(self.data.train)} training / {len(self.data.eval)} evaluation samples, "
                f"{self.dist.world_size} process(es) on {self.dist.device}, global batch {self.global_batch}, "
                f"lr {self.lr:.3g}"
            )
        before = self._resumed_elapsed
        self._clock = (time.perf_counter(), before if before is not None else
                       (self.history[-1]["time_s"] if self.history else 0.0))
        self._last_checkpoint = time.perf_counter()
        try:
            while self.epoch < config.epochs and not self.stopped_by_time_limit:
                row = self._train_epoch()
                self.epoch += 1
                evaluated: dict[str, Any] = {}
                if self.epoch % config.eval_every == 0 or self.epoch == config.epochs or self.stopped_by_time_limit:
                    evaluated = self._evaluate_all()
                    row.update(evaluated)
                row.update(self._count_unreadable())
                row["time_s"] = self._elapsed()
                self.history.append(row)
                self._end_epoch(row)
                self._log_epoch(row, evaluated)
        finally:
            if self.logs is not None:
                self.logs.close()
            self.dist.barrier()
        summary = self.summary()
        if self.dist.is_main and self.last_metrics:
            main = self.task.main_metric
            self._say(
                f"final evaluation {main}: {self.last_metrics[main]:.3f} after {self.epoch} epochs "
                f"({_format_duration(self.history[-1]['time_s'])}); best {self.best:.3f} at epoch {self.best_epoch}; "
                f"run folder: {self.run_dir}"
            )
        return summary

    def _reseed_epoch(self) -> None:
        seed_everything(self.config.seed, self.epoch, self.dist.rank)
        self.train_sampler.set_epoch(self.epoch, start=self.micro_done * self.config.batch_size)
        loader_seed = np.random.SeedSequence([self.config.seed, self.epoch]).generate_state(1)[0]
        self.loader_generator.manual_seed(int(loader_seed))  # the same on every rank

    def _train_epoch(self) -> dict[str, Any]:
        config, dist = self.config, self.dist
        self._reseed_epoch()
        self.train_model.train()
        micro_batches = self.updates_per_epoch * config.accum_steps
        first = self.micro_done  # > 0 when resuming inside the epoch
        loss_sum = torch.tensor(self.epoch_sums[0], dtype=torch.float64)
        samples = torch.tensor(self.epoch_sums[1], dtype=torch.float64)
        bar = _tqdm()(total=micro_batches, initial=first, desc=f"epoch {self.epoch + 1}/{config.epochs}", unit="batch",
                      disable=not (dist.is_main and config.progress), dynamic_ncols=True, mininterval=1.0)
        epoch_start = time.perf_counter()
        self._log_window = [torch.zeros((), dtype=torch.float64), 0, time.perf_counter(), self.step]
        for index, batch in enumerate(self.train_loader, start=first):
            if index >= micro_batches:
                break
            seed_everything(config.seed, self.epoch, index, dist.rank)  # mixup, drop path: from the position only
            last_micro = (index + 1) % config.accum_steps == 0
            sync = contextlib.nullcontext() if last_micro or not dist.enabled else self.train_model.no_sync()
            with sync:
                with autocast(dist.device, config.precision):
                    loss, count = self.task.training_loss(self.train_model, move_to(batch, dist.device))
                finite = bool(torch.isfinite(loss))
                if not finite and not self.guard.enabled:
                    kept = (f", then continue from the last checkpoint (epoch {self.epoch}, kept) with --resume "
                            f"{self.run_dir}") if self.epoch else ""
                    raise FloatingPointError(
                        f"training loss is {loss.item()} at epoch {self.epoch + 1}, step {self.step}; lower --lr "
                        f"or enable --clip-grad{kept}"
                    )
                self.guard.backward(loss / config.accum_steps)  # fp16: a non-finite loss makes the step skipped
            if finite:
                loss_sum += loss.detach().double().cpu() * count
                samples += count
                self._log_window[0] += loss.detach().double().cpu()
                self._log_window[1] += 1
            self.micro_done = index + 1
            if last_micro:
                self._optimizer_step()
                self._after_step(loss_sum, samples, epoch_start, micro_batches)
            bar.update(1)
            if dist.is_main and config.progress and (index % 10 == 0 or index + 1 == micro_batches):
                self._show_progress(bar, loss.item(), epoch_start, index + 1 - first, micro_batches - first)
            if self.stopped_by_time_limit:
                if dist.is_main:
                    self._say(f"time limit of {config.time_limit:g} min reached at step {self.step}: stopping "
                              f"after {index + 1} of {micro_batches} batches of epoch {self.epoch + 1}")
                break
        bar.close()
        self.scheduler.step(self.epoch + 1)
        dist.all_reduce_sum(loss_sum_and_count := torch.stack([loss_sum, samples]).to(dist.device))
        seconds = self.epoch_seconds + time.perf_counter() - epoch_start
        total_samples = loss_sum_and_count[1].item()
        row = dict(epoch=self.epoch + 1, step=self.step, lr=self.optimizer.param_groups[0]["lr"],
                   train_loss=loss_sum_and_count[0].item() / max(total_samples, 1),
                   train_images_per_s=total_samples / seconds)
        if self.guard.enabled:
            row.update(skipped_steps=self.epoch_skipped, loss_scale=self.guard.scale)
        self.micro_done, self.epoch_sums, self.epoch_seconds, self.epoch_skipped = 0, (0.0, 0.0), 0.0, 0
        self._resumed_elapsed = None
        return row

    def _optimizer_step(self) -> None:
        if self.config.clip_grad:
            self.guard.unscale(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), self.config.clip_grad, mode="norm")
        if not self.guard.step(self.optimizer):  # fp16: inf/NaN gradients, the step is skipped (and counted)
            self.epoch_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(num_updates=self._schedule_position())
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def _after_step(self, loss_sum: torch.Tensor, samples: torch.Tensor, epoch_start: float,
                    micro_batches: int) -> None:
        """After an optimizer step: live logs, a recovery checkpoint when one is due, the step callbacks."""
        config = self.config
        if self.logs is not None and self.logs.enabled and self.step % config.log_every == 0:
            window_loss, window_batches, window_start, window_step = self._log_window
            seconds = max(time.perf_counter() - window_start, 1e-9)
            images = (self.step - window_step) * config.accum_steps * config.batch_size * self.dist.world_size
            values = {"train/loss": window_loss.item() / max(window_batches, 1),
                      "train/lr": self.optimizer.param_groups[0]["lr"], "train/images_per_s": images / seconds}
            if self.guard.enabled:
                values.update({"train/loss_scale": self.guard.scale, "train/skipped_steps": self.guard.skipped})
            self.logs.scalars(values, self.step)
            self._log_window = [torch.zeros((), dtype=torch.float64), 0, time.perf_counter(), self.step]
        if self.micro_done < micro_batches and self._checkpoint_due():
            self._save_recovery(loss_sum, samples, time.perf_counter() - epoch_start)
        for callback in self.step_callbacks:
            callback(self)

    def _checkpoint_due(self) -> bool:
        """Whether to save a recovery checkpoint now: every ``checkpoint_every`` steps, else when
        ``checkpoint_minutes`` passed on the main process's clock (the same decision on every process)."""
        config = self.config
        if config.checkpoint_every:
            return self.step % config.checkpoint_every == 0
        if not config.checkpoint_minutes:
            return False
        due = time.perf_counter() - self._last_checkpoint >= config.checkpoint_minutes * 60
        if self.dist.enabled:
            flag = torch.tensor([int(due)], device=self.dist.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _save_recovery(self, loss_sum: torch.Tensor, samples: torch.Tensor, seconds: float) -> None:
        """Write ``recovery-STEP.pt`` (main process) with every process's running loss sums; prune old ones."""
        sums = torch.stack([loss_sum, samples]).to(self.dist.device)  # (2,) float64
        if self.dist.enabled:
            gathered = [torch.zeros_like(sums) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(gathered, sums)
        else:
            gathered = [sums]
        self._last_checkpoint = time.perf_counter()
        if not self.dist.is_main:
            return
        inside = dict(micro_done=self.micro_done, world_size=self.dist.world_size,
                      sums=[[float(value) for value in item.cpu().tolist()] for item in gathered],
                      seconds=self.epoch_seconds + seconds, elapsed=self._elapsed(), skipped=self.epoch_skipped)
        save_training_state(recovery_path(self.checkpoint_dir, self.step), {**self._state(), "inside_epoch": inside})
        prune_recovery_files(self.checkpoint_dir, self.config.keep_checkpoints)  # only after the new one is whole

    def _elapsed(self) -> float:
        """Seconds of training so far (this process's clock), earlier sessions of a resumed run included."""
        start, before = self._clock
        return before + time.perf_counter() - start

    def _schedule_position(self) -> int:
        """The update count the learning-rate schedule is evaluated at: the step count, or with a time budget
        the planned updates times the fraction of the budget used (the slowest process's clock, so every
        process uses the same rate and stops at the same step). Sets ``stopped_by_time_limit``."""
        if self.time_budget is None:
            return self.step
        used = torch.tensor([self._elapsed()], dtype=torch.float64, device=self.dist.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
        fraction = used.item() / self.time_budget
        self.stopped_by_time_limit = fraction >= 1.0
        return int(min(fraction, 1.0) * self.config.epochs * self.updates_per_epoch)

    def _show_progress(self, bar: tqdm, loss: float, epoch_start: float, done: int, total: int) -> None:
        """Loss, lr, images/s (all processes) and the ETA of the whole run on the progress bar."""
        seconds = time.perf_counter() - epoch_start
        per_batch = seconds / done
        remaining = (total - done) * per_batch + (self.config.epochs - self.epoch - 1) * total * per_batch
        if self.time_budget is not None:
            remaining = min(remaining, self.time_budget - self._elapsed())
        bar.set_postfix_str(
            f"loss {loss:.3f}, lr {self.optimizer.param_groups[0]['lr']:.2e}, "
            f"{done * self.config.batch_size * self.dist.world_size / seconds:.0f} img/s, "
            f"run ETA {_format_duration(remaining)}",
            refresh=False,
        )

    def _evaluate_all(self) -> dict[str, Any]:
        """Evaluate the model (and the EMA); returns the scalar metrics, ``ema_`` prefixed for the EMA."""
        progress = self.dist.is_main and self.config.progress
        self.dist.broadcast_buffers(self.model)  # evaluate and save the same weights on every rank
        metrics = evaluate(self.model, self.eval_loader, self.task.new_metrics(self.data.info), self.dist,
                           self.config.precision, progress)
        results = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        self.last_metrics = metrics
        if self.ema is not None:
            self.dist.broadcast_buffers(self.ema.module)
            ema_metrics = evaluate(self.ema.module, self.eval_loader, self.task.new_metrics(self.data.info),
                                   self.dist, self.config.precision, progress, "eval EMA")
            results.update({f"ema_{key}": value for key, value in ema_metrics.items()
                            if isinstance(value, (int, float))})
            self.last_metrics = {**metrics, **{f"ema_{key}": value for key, value in ema_metrics.items()}}
        return results

    def _end_epoch(self, row: dict[str, Any]) -> None:
        """Pick the best, write checkpoints and metrics (main process), and report the epoch."""
        main_key = ("ema_" if self.ema is not None else "") + self.task.main_metric
        improved = main_key in row and (self.best is None or row[main_key] > self.best)
        if improved:
            self.best, self.best_epoch = row[main_key], self.epoch
        if not self.dist.is_main:
            return
        description = dict(config=self.config.to_dict(), data=self.data.info, epoch=self.epoch)
        save_weights_with_metadata(self.model, self.checkpoint_dir / "last.safetensors", description)
        if self.ema is not None:
            save_weights_with_metadata(self.ema.module, self.checkpoint_dir / "last-ema.safetensors", description)
        if improved:
            best_model = self.ema.module if self.ema is not None else self.model
            save_weights_with_metadata(best_model, self.checkpoint_dir / "best.safetensors",
                                       {**description, main_key: row[main_key]})
        save_training_state(self.checkpoint_dir / STATE_FILE, self._state())
        prune_recovery_files(self.checkpoint_dir, self.config.keep_checkpoints, up_to_step=self.step)  # superseded
        write_history(self.run_dir, self.history, self.summary())
        plot_history(self.run_dir / "metrics.png", self.history, self.task.plot_metrics)
        text = f"epoch {self.epoch}/{self.config.epochs}: train loss {row['train_loss']:.4f}"
        for key in (self.task.main_metric, "top5", f"ema_{self.task.main_metric}"):
            if key in row:
                text += f", {key} {row[key]:.3f}"
        text += f" (best {self.best:.3f})" if self.best is not None and main_key in row else ""
        if self.unreadable["train"] or self.unreadable["eval"]:
            names = [self.data.train.source(i) for i in self.unreadable["train"][:2]]
            names += [self.data.eval.source(i) for i in self.unreadable["eval"][:2]]
            text += (f", unreadable images skipped so far: train {len(self.unreadable['train'])}, "
                     f"eval {len(self.unreadable['eval'])} (e.g. {', '.join(names)}; all in metrics.json)")
        self._say(text + f", {row['train_images_per_s']:.0f} img/s, {_format_duration(row['time_s'])} elapsed")

    def _log_epoch(self, row: dict[str, Any], evaluated: dict[str, Any]) -> None:
        """The epoch's training figures and every evaluation metric to the live logs (main process)."""
        if self.logs is None or not self.logs.enabled:
            return
        values = {f"eval/{key}": value for key, value in evaluated.items()}
        values.update({f"epoch/{key}": value for key, value in row.items()
                       if key not in evaluated and key not in ("epoch", "step")})
        self.logs.scalars(values, self.step)
        self.logs.flush()

    def _state(self) -> dict[str, Any]:
        return dict(precision=self.guard.state_dict(),
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), ema=self.ema.module.state_dict() if self.ema else None,
            epoch=self.epoch, step=self.step, best=self.best, best_epoch=self.best_epoch,
            history=self.history, last_metrics=self.last_metrics, config=self.config.to_dict(),
        )

    def summary(self) -> dict[str, Any]:
        """Epochs done, best and final metrics (with per-class values), run folder."""
        unreadable = {split: [dataset.source(index) for index in self.unreadable[split]]
                      for split, dataset in (("train", self.data.train), ("eval", self.data.eval))}
        return dict(epochs_completed=self.epoch, steps=self.step, main_metric=self.task.main_metric,
                    best=self.best, best_epoch=self.best_epoch, final=self.last_metrics, run_dir=str(self.run_dir),
                    unreadable_images=unreadable, stopped_by_time_limit=self.stopped_by_time_limit)

    def _count_unreadable(self) -> dict[str, int]:
        """Update ``self.unreadable`` with every process's findings; the counts for the epoch's metrics row."""
        for split, dataset in (("train", self.data.train), ("eval", self.data.eval)):
            flags = self.dist.all_reduce_sum(dataset.unreadable.to(self.dist.device, torch.float32))  # (N,)
            self.unreadable[split] = flags.nonzero().flatten().tolist()
        return {f"unreadable_{split}_images": len(indices) for split, indices in self.unreadable.items()}

    def _say(self, text: str) -> None:
        _tqdm().write(text)
        sys.stdout.flush()  # lines appear at once in logs and pipes too

    def close(self) -> None:
        self._lock.release()
        self.dist.shutdown()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lr_for(config: TrainConfig, world_size: int) -> float:
    """The learning rate a run uses: ``lr``, or ``lr_base`` scaled by the global batch."""
    return config.lr or config.lr_base * config.batch_size * world_size * config.accum_steps / config.lr_base_size

