"""Fuzzing the command line: garbage values for every option of every subcommand never give a traceback.

Each example runs ``biformer.cli.main`` in-process with one option set to a random value (``--option=VALUE``, so
values starting with ``-`` stay values). A refusal must be one ``error:`` line (argparse's usage lines may precede
it) with a non-zero exit; a value that happens to be valid must exit 0 without an error line. The steps that
would start real work (training, an export, a comparison, drawing) are replaced by stubs that fail the test if a
run ever got that far with options it should have refused, and every command's data is absent, so nothing trains.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from biformer.cli import build_parser, main

GARBAGE = ["", " ", "nan", "inf", "-inf", "-1", "0", "1e400", "1e-400", "0x10", "[a, b]", "[1, 2, 3]", "{foo: 1}",
           "{}", "[]", "null", "none", "true", "'", '"', "{", "[", ":", "1,2,3", "x" * 300, "9" * 40, "../..",
           "/", "-", "é", "1,", ",1", "a,b", "10000000"]
VALUES = st.one_of(st.sampled_from(GARBAGE),
                   st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))


def value_options(command: str) -> list[str]:
    """The long option strings of ``command`` that take a value (switches, --help and --version excluded)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = []
    for action in subparsers.choices[command]._actions:
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.option_strings and takes_value:
            options.append(max(action.option_strings, key=len))
    return options


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A micro training checkpoint, an image, and a folder that does not exist (the data of every command)."""
    from biformer.train.checkpoints import save_weights_with_metadata
    from biformer.train.classification import ClassificationTask
    from biformer.train.config import load_config

    root = tmp_path_factory.mktemp("fuzz")
    micro = {"depth": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "qk_dims": [8, 16, 16, 16], "head_dim": 8,
             "n_win": 1, "topks": [1, 1, 1, -2]}
    config = load_config((dict(model_kwargs=micro, input_size=16, dataset="imagefolder", in_chans=3), "test"))
    info = dict(class_names=["a", "b"], in_chans=3, input_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                interpolation="bilinear", crop_pct=1.0)
    checkpoint = root / "best.safetensors"
    save_weights_with_metadata(ClassificationTask(config).build_model(info), checkpoint,
                               dict(config=config.to_dict(), data=info, epoch=1))
    image = root / "image.png"
    Image.new("RGB", (20, 16), (10, 200, 30)).save(image)
    return dict(checkpoint=str(checkpoint), image=str(image), absent=str(root / "absent"), root=root)


def base_arguments(command: str, files: dict) -> dict[str, str | None]:
    """Options (and positionals, under keys without dashes) that make each command stop before real work."""
    absent, checkpoint, image, root = files["absent"], files["checkpoint"], files["image"], files["root"]
    return {
        "train": {"--dataset": "imagefolder", "--data-dir": absent, "--output": str(root / "runs"), "--epochs": "1"},
        "eval": {"CHECKPOINT": checkpoint, "--dataset": "imagefolder", "--data-dir": absent,
                 "--output": str(root / "eval")},
        "predict": {"IMAGE": image, "--checkpoint": checkpoint, "--output": str(root / "predictions")},
        "show-routing": {"IMAGE": image, "--point": "1,1", "--output": str(root / "routing.png")},
        "export": {"--output": str(root / "model.pt"), "--checkpoint": checkpoint},
        "compare": {"--output": str(root / "compare")},
    }[command]


@pytest.fixture
def no_real_work(monkeypatch):
    """Training, exporting, comparing and drawing are stubs: reaching them with a bad option fails the test."""
    import biformer.cli.export
    import biformer.comparison
    import biformer.train.engine
    import biformer.visualize

    def stop(*args, **kwargs):
        raise ValueError("stopped by the test before real work")

    def stop_comparison(*args, **kwargs):
        raise biformer.comparison.ComparisonError("stopped by the test before real work")

    monkeypatch.setattr(biformer.train.engine.Trainer, "fit", lambda self: stop())
    monkeypatch.setattr(biformer.cli.export, "export_model", stop)
    monkeypatch.setattr(biformer.comparison, "run_comparison", stop_comparison)
    monkeypatch.setattr(biformer.visualize, "show_routing", stop)


def run_command(command: str, option: str, value: str, files: dict) -> tuple[int, str]:
    arguments = dict(base_arguments(command, files))
    arguments[option] = value
    argv = [command]
    argv += [value for key, value in arguments.items() if not key.startswith("-")]
    argv += [f"{key}={value}" for key, value in arguments.items() if key.startswith("-")]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, stderr.getvalue()


def check_outcome(code: int, err: str, where: str) -> None:
    assert "Traceback" not in err, f"{where}: {err}"
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    errors = [line for line in lines if "error: " in line]
    if code == 0:
        assert not errors, f"{where}: exit 0 with {errors}"
        return
    assert len(errors) == 1 and lines[-1] == errors[0], f"{where}: expected one error line, got {err!r}"
    usage_or_error = all(line.startswith(("usage:", " ")) for line in lines[:-1])
    assert usage_or_error, f"{where}: more than one line besides argparse's usage: {err!r}"


COMMANDS = ("train", "eval", "predict", "show-routing", "export", "compare")


@pytest.mark.parametrize("command", COMMANDS)
def test_garbage_option_values_give_one_line(command, files, no_real_work):
    options = value_options(command)
    torch.set_num_threads(1)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(option=st.sampled_from(options), value=VALUES)
    def one(option: str, value: str) -> None:
        code, err = run_command(command, option, value, files)
        check_outcome(code, err, f"biformer {command} {option}={value!r}")

    one()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_the_classic_garbage(command, files, no_real_work):
    """Not random: each option of the command with a few values that broke options before."""
    for option in value_options(command):
        for value in ("nan", "-1", "[a, b]", "x" * 300):
            code, err = run_command(command, option, value, files)
            check_outcome(code, err, f"biformer {command} {option}={value!r}")
