"""``biformer show-routing``: the PNG, model/weight choices, and every bad input's message and exit code."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from PIL import Image

import biformer
from biformer.cli import main
from biformer.hub import save_pretrained
from conftest import fixture_state_dict, load_fixture

MICRO = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = timm.create_model("biformer_tiny", **MICRO)
    model.load_state_dict(fixture_state_dict(load_fixture("biformer_micro")[0]), strict=True)
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "micro")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    pixels = (torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_writes_the_png(folder, image, tmp_path, capsys):
    output = tmp_path / "routing.png"
    code = main(["show-routing", str(image), "--point", "5,5", "--point", "90.5,60", "--checkpoint", str(folder),
                 "-o", str(output), "--image-size", "64", "--dpi", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote" in captured.out and "2 point(s) x 3 BRA layer(s)" in captured.out
    assert "warning" not in captured.err
    with Image.open(output) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "routing.png"]  # no temporary left


def test_random_weights_warn_and_default_output(image, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["show-routing", str(image), "--point", "1,1", "--image-size", "32", "--layers", "stages.0.1.attn",
                 "--dpi", "30"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "weights are random" in captured.err and "1 point(s) x 1 BRA layer(s)" in captured.out
    assert (tmp_path / "photo-routing.png").is_file()


def test_weight_file_with_model_name(image, tmp_path, capsys):
    path = biformer.save_weights(timm.create_model("biformer_tiny", num_classes=4), tmp_path / "tiny.safetensors")
    code = main(["show-routing", str(image), "--point", "3,3", "--model", "biformer_tiny", "--checkpoint", str(path),
                 "-o", str(tmp_path / "out.png"), "--image-size", "32", "--dpi", "30"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out.png").is_file()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["IMAGE", "--point", "96,10"], r"points: (96, 10) is outside the 96x64 image"),
        (["IMAGE", "--point", "5,5", "--model", "resnet50"], "model: expected one of"),
        (["MISSING", "--point", "5,5"], "image: no such file"),
        (["TEXT", "--point", "5,5"], "image: cannot read"),
        (["IMAGE", "--point", "5,5", "-o", "OUT/missing/x.png"], "--output: the folder"),
        (["IMAGE", "--point", "5,5", "-o", "OUT"], "is a folder"),
        (["IMAGE", "--point", "5,5", "-o", "OUT/x.jpg"], "--output: expected a .png file"),
        (["IMAGE", "--point", "5,5", "--layers", "stages.7.attn"], "layers: expected names from"),
        (["IMAGE", "--point", "5,5", "--checkpoint", "OUT/none.pth"], "checkpoint: no such file"),
    ],
)
def test_bad_inputs(folder, image, tmp_path, capsys, arguments, message):
    (tmp_path / "text.png").write_text("not an image")
    replace = {"IMAGE": str(image), "MISSING": str(tmp_path / "nope.png"), "TEXT": str(tmp_path / "text.png")}
    arguments = [replace.get(a, a.replace("OUT", str(tmp_path))) for a in arguments]
    if "--model" not in arguments and "--checkpoint" not in arguments:
        arguments += ["--checkpoint", str(folder)]
    before = sorted(tmp_path.iterdir())
    code = main(["show-routing", *arguments, "--image-size", "32"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("biformer show-routing: error:") or "warning" in captured.err
    assert message in captured.err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_output_folder_not_writable(folder, image, tmp_path, monkeypatch, capsys):
    # (the tests may run as root, for whom permission bits do not stop writes: ask os.access instead)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code = main(["show-routing", str(image), "--point", "5,5", "--checkpoint", str(folder),
                 "-o", str(tmp_path / "x.png")])
    assert code == 1 and "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--point", "5"], "argument --point: expected X,Y"),
        (["--point", "a,b"], "argument --point: expected X,Y"),
        (["--point", "1,2,3"], "argument --point: expected X,Y"),
        (["--point", "inf,2"], "argument --point: expected X,Y"),
        ([], "the following arguments are required: --point"),
        (["--point", "1,1", "--image-size", "0"], "argument --image-size: expected a positive integer"),
    ],
)
def test_usage_errors(image, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["show-routing", str(image), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
