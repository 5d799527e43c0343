"""Wrong command lines, for every subcommand: unknown flags, missing arguments, bad values, missing files.

Usage errors (argparse) exit with code 2 and ``biformer ...: error: ...`` on stderr; errors found while
running exit with 2 (train, eval, predict) or 1 (show-routing, export) and one ``error:`` line.
"""

from __future__ import annotations

import pytest
import torch

from biformer.cli import SUBCOMMANDS, main
from train.synthetic import as_flags, make_image_folder, micro_options

# the least each subcommand needs before argparse looks at the other flags
REQUIRED = {"eval": ["x.safetensors"], "predict": ["x.png", "--checkpoint", "c.safetensors"],
            "show-routing": ["x.png", "--point", "1,1"], "export": ["-o", "m.onnx"]}


def usage_error(arguments: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_unknown_flags_are_refused_by_every_subcommand(command, capsys):
    error = usage_error([command, *REQUIRED.get(command, []), "--no-such-flag"], capsys)
    assert "error: unrecognized arguments: --no-such-flag" in error


def test_no_subcommand_prints_the_help_and_an_unknown_one_is_named(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert "argument COMMAND: invalid choice: 'frobnicate'" in usage_error(["frobnicate"], capsys)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["eval"], "the following arguments are required: checkpoint"),
        (["predict"], "the following arguments are required: IMAGE, --checkpoint"),
        (["show-routing", "x.png"], "the following arguments are required: --point"),
        (["export"], "the following arguments are required: --output"),
        (["eval", "x.safetensors", "--batch-size", "two"], "argument --batch-size: expected int, got 'two'"),
        (["train", "--threads", "1.5"], "argument --threads: expected int | None, got '1.5'"),
        (["train", "--precision"], "argument --precision: expected one argument"),
        (["train", "--download", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_missing_arguments_and_bad_values(arguments, message, capsys):
    assert message in usage_error(arguments, capsys)


@pytest.mark.parametrize(
    "arguments, code, message",
    [
        (["eval", "ABSENT/w.safetensors"], 2, "biformer eval: error: checkpoint: no such file: ABSENT/w.safetensors"),
        (["predict", "x.png", "--checkpoint", "ABSENT/w.safetensors"], 2,
         "biformer predict: error: checkpoint: no such file: ABSENT/w.safetensors"),
        (["show-routing", "ABSENT/x.png", "--point", "1,1"], 1,
         "biformer show-routing: error: image: no such file: ABSENT/x.png"),
        (["export", "-o", "m.onnx", "--checkpoint", "ABSENT/w.pth"], 1,
         "biformer export: error: checkpoint: no such file: ABSENT/w.pth"),
        (["train", "--config", "ABSENT/c.yaml"], 2, "biformer train: error: --config: no such file: ABSENT/c.yaml"),
        (["train", "--resume", "ABSENT"], 2, "biformer train: error: --resume: ABSENT is not a run folder"),
    ],
)
def test_missing_files_are_named(arguments, code, message, tmp_path, capsys):
    absent = str(tmp_path / "absent")
    assert main([argument.replace("ABSENT", absent) for argument in arguments]) == code
    assert capsys.readouterr().err.startswith(message.replace("ABSENT", absent))


def test_train_with_a_missing_pretrained_file(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run",
                                   pretrained=str(tmp_path / "absent.pth")))
    assert main(["train", *flags]) == 2
    expected = f"biformer train: error: option 'pretrained': no such file: {tmp_path / 'absent.pth'}\n"
    assert capsys.readouterr().err == expected


def test_train_with_unreadable_or_foreign_weights_gives_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(3, 1))
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), epochs=1)
    (tmp_path / "truncated.safetensors").write_bytes(b"\x00" * 20)
    assert main(["train", *as_flags({**values, "pretrained": str(tmp_path / "truncated.safetensors")})]) == 2
    assert capsys.readouterr().err.startswith(
        f"biformer train: error: option 'pretrained': cannot read {tmp_path / 'truncated.safetensors'} as weights")
    torch.save({"model": {"stem.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    assert main(["train", *as_flags({**values, "pretrained": str(tmp_path / "foreign.pth")})]) == 2
    assert capsys.readouterr().err.startswith(
        f"biformer train: error: option 'pretrained': {tmp_path / 'foreign.pth'} does not fit BiFormer")

    assert main(["train", *as_flags({**values, "name": "run"})]) == 0
    state = tmp_path / "run" / "checkpoints" / "training-state.pt"
    state.write_bytes(state.read_bytes()[:100])  # corrupted on disk
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"biformer train: error: resume: cannot read {state}")
