"""On resume every option applies or is refused in one line; one process per run folder (the lock)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from biformer.cli import main
from biformer.locks import RunLock
from train.synthetic import _picture, as_flags, make_image_folder, micro_options


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run on a three-class image folder."""
    root = tmp_path_factory.mktemp("resume-options")
    data = make_image_folder(root / "data", per_class=(4, 2))
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(data), output=str(root), name="run",
                                   epochs=1, workers=0))
    assert main(["train", *flags]) == 0
    return root / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize("arguments, named", [
    (["--lr", "0.5"], "lr"),
    (["--weight-decay", "0.1"], "weight_decay"),
    (["--output", "elsewhere", "--name", "other"], "name"),
    (["--model", "biformer_tiny"], "model"),
    (["--opt", "sgd"], "opt"),
])
def test_resume_refuses_options_it_would_ignore(run, capsys, arguments, named):
    before = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "2", *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("biformer train: error: --resume:") and f"'{named}'" in err
    assert (run / "config.yaml").read_text() == before  # nothing written


def test_resume_with_the_same_values_is_accepted(run, capsys):
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", str(saved["lr"])]) == 0
    assert "after 2 epochs" in capsys.readouterr().out


def test_resume_onto_data_with_another_class_count(run, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    data = make_image_folder(tmp_path / "more", per_class=(4, 2))
    for split in ("train", "val"):
        (data / split / "yellow").mkdir()
        _picture(0, rng).save(data / split / "yellow" / "0.png")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume: the run's weights do not fit" in err and "head.weight" in err


def test_a_second_process_on_the_same_run_folder_is_refused(run, capsys):
    with RunLock(run):  # another training process holds the folder
        assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in use by another training process" in err
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # released: it continues
    assert not (run / ".lock").exists()
