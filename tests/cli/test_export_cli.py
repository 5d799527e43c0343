"""``biformer export``: ONNX checked with onnxruntime, TorchScript with a non-square size, and bad inputs."""

from __future__ import annotations

import onnxruntime
import pytest
import timm
import torch

from biformer import export as export_module
from biformer.cli import main
from biformer.hub import load_pretrained, save_pretrained
from conftest import fixture_state_dict, load_fixture

MICRO = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=10)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = timm.create_model("biformer_tiny", **MICRO)
    model.load_state_dict(fixture_state_dict(load_fixture("biformer_micro")[0]), strict=True)
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "micro")


def test_onnx(folder, tmp_path, capsys):
    output = tmp_path / "micro.onnx"
    code = main(["export", "--checkpoint", str(folder), "-o", str(output), "--image-size", "64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote" in captured.out and "64x64 images, dynamic batch size" in captured.out
    assert "checked on a batch of 3 at 64x64: max abs difference" in captured.out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = load_pretrained(folder).eval()(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               atol=1e-4, rtol=0)


def test_torchscript_non_square_without_check(folder, tmp_path, capsys):
    output = tmp_path / "micro.ts"
    code = main(["export", "--model", str(folder), "-o", str(output), "--image-size", "64x96", "--no-check",
                 "--backend", "reference"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(torchscript, 64x96 images" in captured.out and "checked" not in captured.out
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(output)(x), load_pretrained(folder).eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["-o", "OUT/m.onnx", "--opset", "16"], "opset: expected an integer >= 17"),
        (["-o", "OUT/m.bin"], "cannot tell the format from suffix '.bin'"),
        (["-o", "OUT/missing/m.onnx"], "does not exist"),
        (["-o", "OUT/m.onnx", "--batch-size", "1"], "batch_size: expected an integer >= 2"),
        (["-o", "OUT/m.onnx", "--model", "resnet50", "--checkpoint", "OUT/w.pth"], "model: expected one of"),
        (["-o", "OUT/m.pt2", "--dynamic-size", "--image-size", "224"], "--image-size: a --dynamic-size file takes"),
        (["-o", "OUT/m.pt", "--dynamic-size"], "format: dynamic_size needs one of ('onnx', 'torch-export')"),
    ],
)
def test_bad_inputs(folder, tmp_path, capsys, arguments, message):
    arguments = [a.replace("OUT", str(tmp_path)) for a in arguments]
    if "--checkpoint" not in arguments:
        arguments += ["--checkpoint", str(folder)]
    code = main(["export", *arguments])
    captured = capsys.readouterr()
    assert code == 1 and captured.err.startswith("biformer export: error:") and message in captured.err
    assert list(tmp_path.iterdir()) == []


def test_random_weights_warning(tmp_path, monkeypatch, capsys):
    import biformer.cli.export

    def stop(*args, **kwargs):  # the options are valid: stop after the warning instead of exporting
        raise ValueError("stopped by the test")

    monkeypatch.setattr(biformer.cli.export, "export_model", stop)
    code = main(["export", "--model", "biformer_tiny", "-o", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 1 and "exporting random weights" in captured.err and "stopped by the test" in captured.err


def test_failed_check(folder, tmp_path, monkeypatch, capsys):
    def wrong_file(model, example, path, opset):
        path.write_bytes(b"exported")
        return lambda x: model(x) + 1.0

    monkeypatch.setitem(export_module._WRITERS, "torchscript", wrong_file)
    code = main(["export", "--checkpoint", str(folder), "-o", str(tmp_path / "m.pt"), "--image-size", "32"])
    assert code == 1 and "differs from the eager model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["-o", "m.onnx", "--image-size", "64x"], "argument --image-size: expected SIZE or HEIGHTxWIDTH"),
        (["-o", "m.onnx", "--format", "tflite"], "argument --format: invalid choice"),
        (["-o", "m.onnx", "--backend", "auto"], "argument --backend: invalid choice"),
        ([], "the following arguments are required: --output"),
    ],
)
def test_usage_errors(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dynamic_size(folder, tmp_path, capsys):
    output = tmp_path / "micro.pt2"
    code = main(["export", "--model", str(folder), "-o", str(output), "--dynamic-size", "--max-size", "1024"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(torch-export, any height and width from 113 to 1024 px, dynamic batch size)" in captured.out
    assert "checked on a batch of 3 at 113x116, " in captured.out
    program = torch.export.load(output).module()
    model = load_pretrained(folder).eval()
    for size in ((150, 203), (224, 224)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), atol=1e-4, rtol=0)


def test_every_registered_model_name_is_accepted(tmp_path, capsys):
    """biformer_nano (registered with timm, no released weights) exports by name, with or without weights."""
    model = timm.create_model("biformer_nano", num_classes=1000)
    weights = tmp_path / "nano.pth"
    torch.save({"model": model.state_dict()}, weights)
    output = tmp_path / "nano.pt2"
    code = main(["export", "--model", "biformer_nano", "--checkpoint", str(weights), "-o", str(output),
                 "--image-size", "64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(output).module()(x), model.eval()(x), atol=1e-5, rtol=0)
    code = main(["export", "--model", "biformer_nano", "--checkpoint", str(folder_of_wrong_weights(tmp_path)),
                 "-o", str(tmp_path / "bad.pt2")])
    assert code == 1 and "does not fit biformer_nano" in capsys.readouterr().err


def folder_of_wrong_weights(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, path)
    return path
