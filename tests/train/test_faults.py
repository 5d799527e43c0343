"""Faults during training: SIGKILL inside a checkpoint save, write failures (full disk, file too large),
a non-writable output folder, a non-finite loss, and run names or stored paths that point elsewhere.

In every case the previous checkpoint stays loadable and ``--resume`` redoes at most the steps since it.
(SIGKILL in the middle of an epoch: tests/train/test_resume.py.)
"""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from biformer import files as files_module
from biformer.cli import main
from biformer.train import ConfigError, Trainer, load_config
from biformer.train.checkpoints import (
    WriteError,
    load_training_state,
    read_metadata,
    save_training_state,
    save_weights_with_metadata,
)
from biformer.train.classification import ClassificationTask
from train.synthetic import as_flags, make_image_folder, micro_options

STEPS_PER_EPOCH = 3  # 12 training images, batch 4

# Runs a tiny training whose second save of TARGET's file ("state" or "weights") writes half of the
# temporary file and then kills the process with SIGKILL, before the rename.
KILLED_IN_SAVE = """
import json, os, signal, sys
from pathlib import Path
from biformer.train import Trainer, load_config
from biformer import files

values, run_dir, target = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
marker = "training-state" if target == "state" else "last.safetensors"
seen = []
real_sync = files._sync_to_disk

def sync_or_die(temporary):
    if marker in temporary.name:
        seen.append(temporary)
        if len(seen) == 2:
            data = temporary.read_bytes()
            temporary.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real_sync(temporary)

files._sync_to_disk = sync_or_die
Trainer(load_config((values, "test")), run_dir=run_dir).fit()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("faults-data"), per_class=(4, 2))


def options(data, tmp_path, **overrides):
    return micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path / "runs"), name="run",
                         batch_size=4, workers=0, **overrides)


def temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob(".*.tmp"))


@pytest.mark.parametrize("target", ["state", "weights"])
def test_sigkill_during_a_checkpoint_save_then_resume(data, tmp_path, target):
    values = options(data, tmp_path)
    run = tmp_path / "runs" / "run"
    process = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, json.dumps(values), str(run), target],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr
    checkpoints = run / "checkpoints"
    assert len(temporaries(checkpoints)) == 1  # killed with the half-written temporary file in place
    state = load_training_state(checkpoints / "training-state.pt")
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)  # the previous checkpoint is intact
    if target == "weights":
        assert read_metadata(checkpoints / "last.safetensors")["epoch"] == 1

    with Trainer(load_config((values, "test")), resume=True, run_dir=run) as resumed:
        assert (resumed.epoch, resumed.step) == (1, STEPS_PER_EPOCH)  # only the steps since it are redone
        summary = resumed.fit()
    assert summary["epochs_completed"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert temporaries(checkpoints) == []  # the stale temporary file is removed
    assert load_training_state(checkpoints / "training-state.pt")["epoch"] == 2
    assert read_metadata(checkpoints / "last.safetensors")["epoch"] == 2


@pytest.fixture
def file_size_limit():
    """Set a file-size limit (RLIMIT_FSIZE) for this process: writes past it fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error instead of the signal

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_write_refused_by_the_system_keeps_the_previous_files(tmp_path, file_size_limit):
    model = torch.nn.Linear(64, 64)
    weights = save_weights_with_metadata(model, tmp_path / "last.safetensors", {"epoch": 1})
    state = save_training_state(tmp_path / "training-state.pt", {"model": model.state_dict(), "epoch": 1})
    file_size_limit(4096)  # both files are about 17 kB
    with pytest.raises(WriteError, match=r"cannot write .*last.safetensors \(File too large\); its previous version"):
        save_weights_with_metadata(model, weights, {"epoch": 2})
    with pytest.raises(WriteError, match=r"cannot write .*training-state.pt \(File too large\); its previous version"):
        save_training_state(state, {"model": model.state_dict(), "epoch": 2})
    with pytest.raises(WriteError, match=r"new.pt \(File too large\); nothing was written"):
        save_training_state(tmp_path / "new.pt", {"model": model.state_dict(), "epoch": 2})
    assert read_metadata(weights) == {"epoch": 1} and load_training_state(state)["epoch"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.safetensors", "training-state.pt"]


def test_full_disk_during_training_stops_in_one_line_and_the_run_resumes(data, tmp_path, monkeypatch, capsys):
    real_sync, state_saves = files_module._sync_to_disk, []

    def disk_full_at_the_second_state_save(temporary):
        state_saves.extend([temporary] if "training-state" in temporary.name else [])
        if len(state_saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_sync(temporary)

    monkeypatch.setattr(files_module, "_sync_to_disk", disk_full_at_the_second_state_save)
    run = tmp_path / "runs" / "run"
    assert main(["train", *as_flags(options(data, tmp_path))]) == 2
    error = capsys.readouterr().err
    assert error == (f"biformer train: error: cannot write {run / 'checkpoints' / 'training-state.pt'} "
                     "(No space left on device); its previous version is kept\n")
    assert load_training_state(run / "checkpoints" / "training-state.pt")["epoch"] == 1
    assert temporaries(run / "checkpoints") == []

    monkeypatch.undo()  # space freed
    assert main(["train", "--resume", str(run)]) == 0
    assert load_training_state(run / "checkpoints" / "training-state.pt")["step"] == 2 * STEPS_PER_EPOCH


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real_loss, calls = ClassificationTask.training_loss, []

    def nan_in_epoch_two(self, model, batch):
        calls.append(1)
        loss, count = real_loss(self, model, batch)
        return (loss * float("nan") if len(calls) > STEPS_PER_EPOCH else loss), count

    monkeypatch.setattr(ClassificationTask, "training_loss", nan_in_epoch_two)
    values = options(data, tmp_path)
    run = tmp_path / "runs" / "run"
    with pytest.raises(FloatingPointError) as error:
        with Trainer(load_config((values, "test"))) as trainer:
            trainer.fit()
    assert str(error.value).startswith("training loss is nan at epoch 2, step 3; lower --lr or enable --clip-grad, "
                                       f"then continue from the last checkpoint (epoch 1, kept) with --resume {run}")
    state = load_training_state(run / "checkpoints" / "training-state.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(value).all() for value in state["model"].values())
    last = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(last[key], state["model"][key]) for key in last)

    monkeypatch.undo()
    with Trainer(load_config((values, "test")), resume=True, run_dir=run) as resumed:
        assert resumed.fit()["epochs_completed"] == 2


def test_output_folder_errors_name_the_path(data, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "runs"
    # the data folder does not exist either: the output folder is checked first, before any data is read
    flags = ["--output", str(output), "--name", "r", "--dataset", "imagefolder", "--data-dir", "absent"]
    assert main(["train", *flags]) == 2
    assert capsys.readouterr().err == (f"biformer train: error: output: cannot create {output / 'r'}: "
                                       f"{tmp_path / 'a-file'} is a file, not a folder\n")
    # root may write anywhere, so a read-only folder is simulated through os.access
    monkeypatch.setattr(files_module.os, "access", lambda path, mode: False)
    assert main(["train", *as_flags(options(data, tmp_path))]) == 2
    assert capsys.readouterr().err.startswith(f"biformer train: error: output: cannot write in {tmp_path} "
                                              "(permission denied)")
    assert not (tmp_path / "runs").exists()


def test_eval_output_folder_that_cannot_be_created(data, tmp_path, capsys):
    with Trainer(load_config((options(data, tmp_path, epochs=1), "test"))) as trainer:
        trainer.fit()
    (tmp_path / "a-file").write_text("not a folder")
    checkpoint = tmp_path / "runs" / "run" / "checkpoints" / "last.safetensors"
    assert main(["eval", str(checkpoint), "--output", str(tmp_path / "a-file" / "eval")]) == 2
    assert capsys.readouterr().err.startswith(f"biformer eval: error: --output: cannot create {tmp_path}/a-file/eval")


@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere", "nested/name", "..", ".", ""])
def test_run_names_that_leave_the_output_folder_are_refused(tmp_path, monkeypatch, capsys, name):
    with pytest.raises(ConfigError, match="option 'name': expected a single folder name inside 'output'"):
        load_config(({"name": name, "output": str(tmp_path)}, "test"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--name", name]) == 2
    assert "biformer train: error: option 'name': expected a single folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_paths_stored_in_a_run_are_never_written_to(data, tmp_path):
    values = options(data, tmp_path, epochs=1)
    run = tmp_path / "runs" / "run"
    with Trainer(load_config((values, "test"))) as trainer:
        trainer.fit()
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored.update(output=str(tmp_path / "elsewhere"), name="other")  # a run folder that was moved or edited
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert not (tmp_path / "elsewhere").exists()
    assert load_training_state(run / "checkpoints" / "training-state.pt")["epoch"] == 2


def test_paths_stored_in_a_checkpoint_are_never_written_to(data, tmp_path, capsys):
    with Trainer(load_config((options(data, tmp_path, epochs=1), "test"))) as trainer:
        trainer.fit()
    last = tmp_path / "runs" / "run" / "checkpoints" / "last.safetensors"
    description = read_metadata(last)
    description["config"].update(output=str(tmp_path / "elsewhere"), name="../../escape")  # a hostile file
    (tmp_path / "shared").mkdir()
    hostile = save_weights_with_metadata(trainer.model, tmp_path / "shared" / "hostile.safetensors", description)
    assert main(["eval", str(hostile)]) == 0
    assert (tmp_path / "shared" / "hostile-eval" / "eval.json").is_file()  # beside the file, as documented
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path.parent / "escape").exists()
