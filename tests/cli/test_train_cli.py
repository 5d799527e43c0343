"""``biformer train`` on the command line: help, version, flags, YAML, errors, resume, ``python -m biformer``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import biformer
from biformer.cli import main
from train.synthetic import as_flags, make_fashion_mnist, make_image_folder, micro_options


def test_help_lists_the_subcommands_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("train", "eval", "predict"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--resume", "--epochs", "--lr-base", "--mixup", "--model-ema", "--precision",
                 "--grad-checkpointing", "--pretrained", "--accum-steps", "--clip-grad", "--auto-augment"):
        assert flag in text, flag
    assert "torchrun --nproc_per_node=2" in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"biformer {biformer.__version__}"


def test_python_dash_m_biformer_runs_the_same_command():
    process = subprocess.run([sys.executable, "-m", "biformer", "train", "--help"], capture_output=True, text=True,
                             timeout=60)
    assert process.returncode == 0 and "--resume RUN" in process.stdout


def test_yaml_config_flags_and_saved_config(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "fm", train=16, test=10)
    config_file = tmp_path / "run.yaml"
    values = micro_options(data_dir=str(data), output=str(tmp_path / "runs"), name="yaml", epochs=3, download=False)
    config_file.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config_file), "--epochs", "1", "--smoothing", "0.2"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "yaml" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["smoothing"] == 0.2  # flags win
    assert saved["model_kwargs"] == values["model_kwargs"] and saved["data_dir"] == str(data)  # from the file
    assert saved["lr_base"] == 8e-3  # a default
    output = capsys.readouterr().out
    assert "final evaluation top1" in output and "epoch 1/1" in output


def test_resume_from_the_command_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="r",
                                   epochs=1, workers=0))
    assert main(["train", *flags]) == 0
    # continue the finished run for one more epoch (the flag overrides the saved configuration)
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "2"]) == 0
    assert "after 2 epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--epochs", "0"], "option 'epochs': expected an integer >= 1, got 0"),
        (["--config", "absent.yaml"], "--config: no such file"),
        (["--resume", "nowhere"], "--resume: nowhere is not a run folder"),
        (["--dataset", "imagefolder", "--data-dir", "absent"], "imagefolder: no such folder"),
        (["--data-dir", "absent", "--no-download"], "Fashion-MNIST not found"),
        (["--model", "resnet_unknown"], "unknown timm model"),
    ],
)
def test_bad_arguments_give_one_clear_line(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("biformer train: error: ") and message in error


@pytest.mark.parametrize("arguments", [["--epochs", "two"], ["--model-kwargs", "[1, 2]"], ["--unknown-flag"]])
def test_malformed_flags_are_rejected_by_the_parser(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *arguments])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
