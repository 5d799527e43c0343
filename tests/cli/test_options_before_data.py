"""Every command checks its options, model name, model arguments, output folder and weights files before it reads
any data, builds scenes or loads a model: a mistyped option is reported at once, naming the option, also on a
machine without the dataset (the session's search path is empty, see tests/conftest.py).

Each test makes reading the data (or the image, or the model) fail the test outright, so the only way to pass
is to report the option first."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from biformer.cli import main
from biformer.train import Trainer, load_config
from train.synthetic import make_fashion_mnist, micro_options

DENSE_BACKBONE = {"depth": [1, 1, 1, 1], "embed_dim": [16, 16, 32, 32], "qk_dims": [16, 16, 32, 32], "head_dim": 16,
                  "topks": [1, 4, 4, -2], "mlp_ratios": [2, 2, 2, 2]}


def _never(what: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} was read before the options were checked")

    return called


@pytest.fixture
def no_data_read(monkeypatch):
    """Reading Fashion-MNIST (classification and the scenes' crops) fails the test."""
    import biformer.dense.scenes
    import biformer.train.classification

    monkeypatch.setattr(biformer.train.classification, "find_fashion_mnist", _never("Fashion-MNIST"))
    monkeypatch.setattr(biformer.dense.scenes, "load_fashion_mnist", _never("Fashion-MNIST (scenes)"))


def _one_error_line(capsys, command: str) -> str:
    error = capsys.readouterr().err
    assert error.startswith(f"biformer {command}: error: ") and error.count("\n") == 1, error
    return error


@pytest.mark.parametrize("arguments, message", [
    (["--model", "resnet_unknown"], "option 'model': unknown timm model 'resnet_unknown'"),
    (["--model-kwargs", '{"bogus": 1}'], "option 'model_kwargs': ['bogus'] are not architecture arguments"),
    (["--model-kwargs", '{"n_win": "many"}'], "n_win: expected an integer >= 1, got 'many'"),
    (["--in-chans", "4"], "option 'in_chans': images are read as 1 (L) or 3 (RGB) channels, got 4"),
    (["--pretrained", "absent.pth"], "option 'pretrained': no such file: absent.pth"),
    (["--pretrained", "garbage.safetensors"], "option 'pretrained': cannot read garbage.safetensors as weights"),
])
def test_train_checks_the_model_before_the_data(tmp_path, monkeypatch, capsys, no_data_read, arguments, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    assert main(["train", *arguments]) == 2
    assert message in _one_error_line(capsys, "train")
    assert not (tmp_path / "runs").exists()  # no run folder left behind


def test_train_pretrained_weights_that_do_not_fit_are_refused_before_the_data(tmp_path, monkeypatch, capsys,
                                                                              no_data_read):
    import timm

    other = timm.create_model("biformer_nano", depth=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], head_dim=8)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    flags = ["--model-kwargs", json.dumps(micro_options()["model_kwargs"]), "--pretrained", str(tmp_path / "other.pth")]
    assert main(["train", *flags, "--output", str(tmp_path / "runs")]) == 2
    assert "option 'pretrained': " + str(tmp_path / "other.pth") + " does not fit" in _one_error_line(capsys, "train")


def test_train_resume_reads_the_training_state_before_the_data(tmp_path, capsys, no_data_read):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(micro_options(output=str(tmp_path), name="run")))
    (run / "checkpoints" / "training-state.pt").write_bytes(b"truncated")
    assert main(["train", "--resume", str(run)]) == 2
    assert "resume: cannot read" in _one_error_line(capsys, "train")


@pytest.mark.parametrize("task", ["segmentation", "detection"])
@pytest.mark.parametrize("overrides, message", [
    (dict(model_kwargs={"n_win": "many"}), "option 'model_kwargs': cannot build"),
    (dict(model_kwargs={"bogus": 1}), "option 'model_kwargs': ['bogus'] are not architecture arguments"),
    (dict(pretrained="absent.safetensors"), "option 'pretrained': no such file: absent.safetensors"),
    (dict(model="resnet50"), "option 'model': expected a backbone preset"),
])
def test_dense_training_checks_the_model_before_composing_scenes(tmp_path, monkeypatch, capsys, no_data_read, task,
                                                                 overrides, message):
    monkeypatch.chdir(tmp_path)
    values = dict(task=task, model_kwargs=DENSE_BACKBONE, input_size=64, head_channels=16, train_scenes=4,
                  val_scenes=2, output=str(tmp_path / "runs"))
    values.update(overrides)
    flags = [part for key, value in values.items()
             for part in ("--" + key.replace("_", "-"), json.dumps(value) if isinstance(value, dict) else str(value))]
    assert main(["train", *flags, "--no-progress"]) == 2
    assert message in _one_error_line(capsys, "train")


def test_dense_pretrained_weights_that_do_not_fit_are_refused_before_the_scenes(tmp_path, capsys, no_data_read):
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "unrelated.pth")
    flags = ["--task", "segmentation", "--model-kwargs", json.dumps(DENSE_BACKBONE), "--input-size", "64",
             "--pretrained", str(tmp_path / "unrelated.pth"), "--output", str(tmp_path / "runs")]
    assert main(["train", *flags]) == 2
    assert "option 'pretrained': " in _one_error_line(capsys, "train")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro classifier trained one epoch on a tiny Fashion-MNIST lookalike (its data then removed)."""
    root = tmp_path_factory.mktemp("checkpoint")
    data = make_fashion_mnist(root / "fm", train=16, test=10)
    config = load_config((micro_options(data_dir=str(data), epochs=1, download=False), "test"))
    with Trainer(config, run_dir=root / "run") as trainer:
        trainer.fit()
    for path in data.iterdir():
        path.unlink()
    return root / "run" / "checkpoints" / "best.safetensors"


@pytest.mark.parametrize("arguments, message", [
    (["--output", "{file}"], "--output: "),
    (["--dataset", "nonsense"], "option 'dataset': expected one of"),
    (["--batch-size", "0"], "option 'batch_size': expected an integer >= 1"),
])
def test_eval_checks_options_and_output_before_the_data(checkpoint, tmp_path, capsys, no_data_read, arguments,
                                                        message):
    (tmp_path / "a-file").write_text("")
    arguments = [argument.format(file=tmp_path / "a-file" / "eval") for argument in arguments]
    assert main(["eval", str(checkpoint), *arguments]) == 2
    assert message in _one_error_line(capsys, "eval")


def test_eval_of_a_foreign_file_checks_the_model_name_before_the_data(tmp_path, capsys, no_data_read):
    torch.save({"head.weight": torch.zeros(10, 8)}, tmp_path / "weights.pth")
    assert main(["eval", str(tmp_path / "weights.pth"), "--model", "resnet_unknown"]) == 2
    assert "--model: unknown timm model 'resnet_unknown'" in _one_error_line(capsys, "eval")


@pytest.mark.parametrize("arguments, message", [
    (["--score-threshold", "2"], "--score-threshold: expected a score in [0, 1], got 2.0"),
    (["--device", "nonsense"], "--device: Expected one of cpu"),
    (["--top-k", "0"], "--top-k: expected an integer >= 1, got 0"),
])
def test_predict_checks_options_before_the_checkpoint_and_the_images(tmp_path, monkeypatch, capsys, arguments,
                                                                     message):
    import biformer.images
    import biformer.train.inference

    monkeypatch.setattr(biformer.train.inference, "load_for_inference", _never("the checkpoint"))
    monkeypatch.setattr(biformer.images, "open_image", _never("the image"))
    Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
    assert main(["predict", str(tmp_path / "image.png"), "--checkpoint", str(tmp_path / "absent.safetensors"),
                 *arguments]) == 2
    assert message in _one_error_line(capsys, "predict")


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "classification", "--model", "resnet_unknown"], "--model: unknown timm model 'resnet_unknown'"),
    (["--tasks", "cost", "--model", "resnet_unknown"], "--model: unknown timm model 'resnet_unknown'"),
    (["--tasks", "classification", "--attn-types", "bra", "--model-kwargs", "{bogus: 1}"],
     "--model-kwargs: ['bogus'] are not architecture arguments"),
])
def test_compare_checks_models_before_the_data(tmp_path, monkeypatch, capsys, arguments, message):
    import biformer.comparison

    monkeypatch.setattr(biformer.comparison, "fashion_mnist_subset", _never("Fashion-MNIST"))
    monkeypatch.setattr(biformer.comparison, "measure_cost", _never("the cost models"))
    assert main(["compare", *arguments, "--output", str(tmp_path / "run")]) == 2
    assert message in _one_error_line(capsys, "compare")
    assert not (tmp_path / "run" / "data").exists()


def test_compare_finds_the_scenes_crops_before_measuring(tmp_path, monkeypatch, capsys):
    import biformer.comparison

    monkeypatch.setattr(biformer.comparison, "measure_cost", _never("the cost models"))
    assert main(["compare", "--tasks", "cost,segmentation", "--attn-types", "bra", "--model", "biformer_nano",
                 "--output", str(tmp_path / "run")]) == 2
    assert "Fashion-MNIST not found" in _one_error_line(capsys, "compare")


def test_show_routing_checks_the_model_before_reading_the_image(tmp_path, monkeypatch, capsys):
    import biformer.cli.show_routing

    monkeypatch.setattr(biformer.cli.show_routing, "open_image", _never("the image"))
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    code = main(["show-routing", str(tmp_path / "photo.png"), "--point", "1,1", "--model", "resnet_unknown",
                 "-o", str(tmp_path / "routing.png")])
    assert code == 1
    assert "model: expected one of" in _one_error_line(capsys, "show-routing")


@pytest.mark.parametrize("arguments, message", [
    (["-o", "{tmp}/model.txt"], "output: cannot tell the format from suffix '.txt'"),
    (["-o", "{tmp}/absent/model.onnx"], "output: the folder"),
    (["-o", "{tmp}/model.onnx", "--opset", "16"], "opset: expected an integer >= 17, got 16"),
    (["-o", "{tmp}/model.onnx", "--batch-size", "1"], "batch_size: expected an integer >= 2"),
])
def test_export_checks_options_before_loading_the_model(tmp_path, monkeypatch, capsys, arguments, message):
    import biformer.cli.export

    monkeypatch.setattr(biformer.cli.export, "load_model", _never("the model"))
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert main(["export", "--checkpoint", str(tmp_path / "absent.pth"), *arguments]) == 1
    assert message in _one_error_line(capsys, "export")
