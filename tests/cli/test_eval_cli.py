"""``biformer eval``: metrics of our checkpoints and of authors'-format files, against a plain per-image loop."""

from __future__ import annotations

import errno
import json

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from biformer import files, load_checkpoint
from biformer.cli import main
from biformer.train import Trainer, load_config
from train.synthetic import make_image_folder, micro_options


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model trained for one epoch on the three-colour folder; its best checkpoint and data."""
    root = tmp_path_factory.mktemp("eval")
    data = make_image_folder(root / "data", per_class=(6, 4))
    config = load_config((micro_options(dataset="imagefolder", data_dir=str(data), epochs=1, lr=1e-3), "test"))
    with Trainer(config, run_dir=root / "run") as trainer:
        trainer.fit()
    return root / "run" / "checkpoints" / "last.safetensors", data, config


def plain_predictions(model, transform, folder, mode="RGB"):
    """(true label index, predicted index) for every image of an ImageFolder tree, one image at a time."""
    pairs = []
    for label, class_folder in enumerate(sorted(path for path in folder.iterdir() if path.is_dir())):
        for image_path in sorted(class_folder.iterdir()):
            image = transform(Image.open(image_path).convert(mode)).unsqueeze(0)
            with torch.no_grad():
                pairs.append((label, model(image).argmax(-1).item()))
    return pairs


def test_eval_of_our_checkpoint_matches_a_plain_loop(trained, tmp_path, capsys):
    checkpoint, data, config = trained
    assert main(["eval", str(checkpoint), "--output", str(tmp_path), "--no-progress", "--batch-size", "5"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = timm.create_model("biformer_nano", num_classes=3, **config.model_kwargs)
    load_checkpoint(model, checkpoint)
    transform = create_transform(16, interpolation="bilinear", crop_pct=1.0, mean=timm.data.IMAGENET_DEFAULT_MEAN,
                                 std=timm.data.IMAGENET_DEFAULT_STD)
    pairs = plain_predictions(model.eval(), transform, data / "val")
    expected = [[0] * 3 for _ in range(3)]
    for true, predicted in pairs:
        expected[true][predicted] += 1
    assert report["confusion"] == expected
    assert report["top1"] == pytest.approx(100 * sum(t == p for t, p in pairs) / len(pairs))
    assert report["top5"] == 100.0  # three classes: always within the top 5
    per_class = [100 * expected[c][c] / sum(expected[c]) for c in range(3)]
    assert report["per_class_top1"] == pytest.approx(per_class)
    text = capsys.readouterr().out
    assert "top-1" in text and "per-class top-1" in text and "green" in text


def test_default_output_folder_is_beside_the_checkpoint(trained, capsys):
    checkpoint, _, _ = trained
    assert main(["eval", str(checkpoint), "--no-progress"]) == 0
    assert (checkpoint.parent / "last-eval" / "eval.json").is_file()


def test_eval_of_an_authors_format_file_on_imagenet_folders(tmp_path):
    # an ImageNet-style validation tree: folders named by synset
    synsets = ImageNetInfo().label_names()[:2]
    for index, synset in enumerate(synsets):
        (tmp_path / "imagenet" / "val" / synset).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200 * index, 50, 90)).save(tmp_path / "imagenet" / "val" / synset / "a.png")
    model = timm.create_model("biformer_nano").eval()
    torch.save({"model": model.state_dict(), "epoch": 300}, tmp_path / "nano_in1k.pth")
    arguments = ["eval", str(tmp_path / "nano_in1k.pth"), "--dataset", "imagefolder", "--data-dir",
                 str(tmp_path / "imagenet"), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(arguments + ["--model", "biformer_nano"]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    transform = create_transform(**resolve_data_config({}, model=model))  # 224 px, bicubic, crop 0.875
    pairs = plain_predictions(model, transform, tmp_path / "imagenet" / "val")
    assert report["samples"] == 2
    assert report["top1"] == pytest.approx(100 * sum(t == p for t, p in pairs) / 2)


def test_eval_errors(trained, tmp_path, capsys):
    checkpoint, _, _ = trained
    torch.save({"model": timm.create_model("biformer_nano").state_dict()}, tmp_path / "foreign.pth")
    assert main(["eval", str(tmp_path / "foreign.pth")]) == 2
    assert "pass the timm model name it belongs to, e.g. --model biformer_tiny" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "absent.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--model", "biformer_tiny"]) == 2
    assert "holds a biformer_nano, not a biformer_tiny" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--data-dir", str(tmp_path / "gone")]) == 2
    assert "imagefolder: no such folder" in capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    assert main(["eval", str(tmp_path / "broken.safetensors")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_full_disk_while_writing_the_report_is_one_line(trained, tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = trained

    def disk_full(temporary):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_sync_to_disk", disk_full)
    assert main(["eval", str(checkpoint), "--output", str(tmp_path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("biformer eval: error: cannot write ") and "eval.json (No space left on device)" in error
    assert error.count("\n") == 1 and list(tmp_path.iterdir()) == []  # no partial file, no temporary
