"""``biformer predict``: top-k labels and probabilities from our checkpoints and from authors'-format files."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from biformer.cli import main
from biformer.train import Trainer, load_config
from train.synthetic import make_fashion_mnist, micro_options


@pytest.fixture(scope="module")
def grayscale_checkpoint(tmp_path_factory):
    """A micro model trained one epoch on the Fashion-MNIST lookalike (one channel, ten classes)."""
    root = tmp_path_factory.mktemp("predict")
    data = make_fashion_mnist(root / "fm", train=16, test=10)
    config = load_config((micro_options(data_dir=str(data), epochs=1, download=False), "test"))
    with Trainer(config, run_dir=root / "run") as trainer:
        trainer.fit()
    return root / "run" / "checkpoints" / "best.safetensors", trainer.model.eval(), config


def test_our_checkpoint_gives_class_names_and_probabilities(grayscale_checkpoint, tmp_path, capsys):
    checkpoint, model, config = grayscale_checkpoint
    picture = tmp_path / "shirt.png"
    Image.new("RGB", (28, 28), (120, 130, 140)).save(picture)  # colour input: converted to one channel
    assert main(["predict", str(picture), "--checkpoint", str(checkpoint), "--top-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == str(picture) and len(result["top"]) == 3

    transform = create_transform(16, crop_pct=1.0, interpolation="bilinear", mean=(0.2860,), std=(0.3530,))
    with torch.no_grad():
        probabilities = model(transform(Image.open(picture).convert("L")).unsqueeze(0)).softmax(-1)[0]
    top = probabilities.topk(3)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert [entry["label"] for entry in result["top"]] == [names[i] for i in top.indices.tolist()]
    assert [entry["probability"] for entry in result["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_authors_format_file_gets_imagenet_names(tmp_path, capsys):
    model = timm.create_model("biformer_nano").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "nano_in1k.pth")
    picture = tmp_path / "photo.jpg"
    Image.new("RGB", (300, 200), (30, 140, 200)).save(picture)
    assert main(["predict", str(picture), "--checkpoint", str(tmp_path / "nano_in1k.pth"), "--model",
                 "biformer_nano", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        best = model(transform(Image.open(picture).convert("RGB")).unsqueeze(0)).softmax(-1)[0].argmax().item()
    assert lines[0] == str(picture) and len(lines) == 3
    assert lines[1].endswith(ImageNetInfo().index_to_description(best))


def test_unreadable_image_is_reported_and_the_others_still_classified(grayscale_checkpoint, tmp_path, capsys):
    checkpoint, _, _ = grayscale_checkpoint
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("L", (28, 28), 200).save(good)
    bad.write_bytes(b"not an image")
    assert main(["predict", str(bad), str(good), "--checkpoint", str(checkpoint)]) == 1
    captured = capsys.readouterr()
    assert "cannot read" in captured.err and str(bad) in captured.err
    assert captured.out.splitlines()[0] == str(good) and len(captured.out.splitlines()) == 6  # top 5


def test_predict_errors(grayscale_checkpoint, tmp_path, capsys):
    checkpoint, _, _ = grayscale_checkpoint
    assert main(["predict", "x.png", "--checkpoint", str(checkpoint), "--top-k", "0"]) == 2
    assert "--top-k: expected an integer >= 1, got 0" in capsys.readouterr().err
    torch.save({"model": timm.create_model("biformer_nano").state_dict()}, tmp_path / "foreign.pth")
    assert main(["predict", "x.png", "--checkpoint", str(tmp_path / "foreign.pth")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["predict", "x.png", "--checkpoint", str(tmp_path / "foreign.pth"), "--model", "biformer_tiny"]) == 2
    assert "shapes differ from the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "x.png"])
    assert exit_info.value.code == 2 and "--checkpoint" in capsys.readouterr().err
