"""Checkpoints: a run killed with SIGKILL mid-epoch and resumed ends bit-identical to an uninterrupted run;
a crash during a save leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biformer import files as files_module
from biformer.train import Trainer, load_config
from biformer.train.checkpoints import (
    load_training_state,
    read_metadata,
    save_training_state,
    save_weights_with_metadata,
)
from train.synthetic import make_image_folder, micro_options

# Every stochastic piece of the recipe at once: mixup/cutmix, RandAugment, random erasing, drop path, EMA,
# gradient accumulation, clipping, and a data-loading worker process.
RECIPE = dict(epochs=3, batch_size=4, accum_steps=2, mixup=0.5, cutmix=0.5, auto_augment="rand-m9-mstd0.5-inc1-mmax9",
              reprob=0.5, drop_path=0.2, model_ema=True, model_ema_decay=0.9, clip_grad=1.0, workers=1)

KILLED_RUN = """
import json, os, signal, sys
from biformer.train import Trainer, load_config

values, run_dir, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def kill(trainer):
    if trainer.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

trainer = Trainer(load_config((values, "test")), run_dir=run_dir)
trainer.step_callbacks.append(kill)
trainer.fit()
"""


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data")
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), **RECIPE)
    config = load_config((values, "test"))
    with Trainer(config, run_dir=tmp_path / "straight") as trainer:
        trainer.fit()
    steps_per_epoch = trainer.updates_per_epoch
    assert steps_per_epoch == 3 and trainer.step == 9

    # the same run in another process, killed in the middle of epoch 2 (after a checkpoint at the end of epoch 1)
    interrupted = tmp_path / "interrupted"
    process = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(values), str(interrupted), str(steps_per_epoch + 2)],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    state = load_training_state(interrupted / "checkpoints" / "training-state.pt")
    assert (state["epoch"], state["step"]) == (1, steps_per_epoch)

    with Trainer(config, resume=True, run_dir=interrupted) as resumed:
        assert resumed.epoch == 1
        resumed.fit()
    for name in ("last.safetensors", "last-ema.safetensors", "best.safetensors"):
        expected = weights(tmp_path / "straight" / "checkpoints" / name)
        actual = weights(interrupted / "checkpoints" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    straight_history = json.loads((tmp_path / "straight" / "metrics.json").read_text())["history"]
    resumed_history = json.loads((interrupted / "metrics.json").read_text())["history"]
    for before, after in zip(straight_history, resumed_history, strict=True):
        assert {k: v for k, v in before.items() if "time" not in k and "per_s" not in k} == \
            {k: v for k, v in after.items() if "time" not in k and "per_s" not in k}


def _same_history(straight: Path, resumed: Path) -> None:
    before = json.loads((straight / "metrics.json").read_text())["history"]
    after = json.loads((resumed / "metrics.json").read_text())["history"]
    for row_before, row_after in zip(before, after, strict=True):
        assert {k: v for k, v in row_before.items() if "time" not in k and "per_s" not in k} == \
            {k: v for k, v in row_after.items() if "time" not in k and "per_s" not in k}


def _same_weights(straight: Path, resumed: Path, names=("last.safetensors", "last-ema.safetensors")) -> None:
    for name in names:
        expected, actual = weights(straight / "checkpoints" / name), weights(resumed / "checkpoints" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)


def test_sigkill_at_a_random_step_resumes_from_the_last_recovery_checkpoint(tmp_path):
    """--checkpoint-every 2: killed at any step of epoch 2, the run continues from the latest saved step (not the
    start of the epoch) with the same data order, augmentations and optimizer state, ending bit-identical."""
    data = make_image_folder(tmp_path / "data")
    recipe = dict(RECIPE, epochs=2, accum_steps=1, checkpoint_every=2, keep_checkpoints=2)
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), **recipe)
    config = load_config((values, "test"))
    with Trainer(config, run_dir=tmp_path / "straight") as trainer:
        trainer.fit()
    assert trainer.updates_per_epoch == 6 and trainer.step == 12
    assert not list((tmp_path / "straight" / "checkpoints").glob("recovery-*"))  # superseded at the epoch's end

    kill_at = int(np.random.default_rng().integers(7, 12))  # any step inside epoch 2 (steps 7..11)
    interrupted = tmp_path / "interrupted"
    process = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(values), str(interrupted), str(kill_at)],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    kept = sorted(path.name for path in (interrupted / "checkpoints").glob("recovery-*.pt"))
    expected_steps = [step for step in (8, 10) if step <= kill_at][-2:]
    assert kept == [f"recovery-{step:09d}.pt" for step in expected_steps], (kill_at, kept)  # bounded, newest kept

    with Trainer(config, resume=True, run_dir=interrupted) as resumed:
        assert (resumed.epoch, resumed.step) == (1, max([6, *expected_steps])), kill_at
        assert resumed.micro_done == resumed.step - 6
        resumed.fit()
    _same_weights(tmp_path / "straight", interrupted, ("last.safetensors", "last-ema.safetensors", "best.safetensors"))
    _same_history(tmp_path / "straight", interrupted)
    assert not list((interrupted / "checkpoints").glob("recovery-*"))


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    config = load_config((micro_options(dataset="imagefolder", data_dir=str(data), epochs=1), "test"))
    with Trainer(config, run_dir=tmp_path / "run") as trainer:
        trainer.fit()
    before = weights(tmp_path / "run" / "checkpoints" / "last.safetensors")
    with Trainer(config, resume=True, run_dir=tmp_path / "run") as trainer:
        summary = trainer.fit()
    assert summary["epochs_completed"] == 1 and trainer.step == 1
    after = weights(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)


class Exploding(RuntimeError):
    pass


def test_crash_during_a_weights_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    path = save_weights_with_metadata(model, tmp_path / "last.safetensors", {"epoch": 1})
    previous = weights(path)

    def crash_half_way(temporary):
        Path(temporary).write_bytes(b"half a file")
        raise Exploding("killed")

    monkeypatch.setattr(files_module, "_sync_to_disk", crash_half_way)  # after the write, before the rename
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(Exploding):
        save_weights_with_metadata(model, path, {"epoch": 2})
    assert all(torch.equal(previous[key], value) for key, value in weights(path).items())
    assert read_metadata(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.safetensors"]  # no temporary file left behind


def test_crash_during_a_state_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_training_state(tmp_path / "training-state.pt", {"model": {}, "epoch": 1})

    def crash_half_way(temporary):
        Path(temporary).write_bytes(b"PK\x03\x04 truncated")
        raise Exploding("killed")

    monkeypatch.setattr(files_module, "_sync_to_disk", crash_half_way)  # after the write, before the rename
    with pytest.raises(Exploding):
        save_training_state(path, {"model": {}, "epoch": 2})
    monkeypatch.undo()
    assert load_training_state(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["training-state.pt"]


def test_unreadable_training_state(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="resume: cannot read"):
        load_training_state(tmp_path / "state.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a training state"):
        load_training_state(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no training state"):
        load_training_state(tmp_path / "absent.pt")
