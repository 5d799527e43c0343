"""Fine-tuning from a checkpoint: ours or the authors' format, a new head, an adapted stem, clear mismatches."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer.train  # noqa: F401  (registers biformer_nano)
from biformer import save_weights
from biformer.train import Trainer, load_config
from biformer.train.classification import load_pretrained
from train.synthetic import MICRO_MODEL_KWARGS, make_fashion_mnist, make_image_folder, micro_options


def micro(**kwargs):
    return timm.create_model("biformer_nano", **{**MICRO_MODEL_KWARGS, **kwargs})


def test_authors_format_rgb_1000_classes_into_grayscale_10_classes(tmp_path):
    source = micro(num_classes=1000)
    torch.save({"model": source.state_dict(), "epoch": 299}, tmp_path / "authors.pth")
    target = micro(num_classes=10, in_chans=1)
    fresh_head = {key: value.clone() for key, value in target.head.state_dict().items()}
    assert load_pretrained(target, tmp_path / "authors.pth") == ["head.bias", "head.weight"]
    expected = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith("head."):
            assert torch.equal(value, fresh_head[key.removeprefix("head.")]), key  # left fresh
        elif key == "downsample_layers.0.0.weight":
            # grayscale stem: the three colour filters summed (timm's adapt_input_conv)
            torch.testing.assert_close(value, expected[key].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(value, expected[key]), key


def test_our_grayscale_checkpoint_into_rgb_keeps_a_same_sized_head(tmp_path):
    source = micro(num_classes=3, in_chans=1)
    save_weights(source, tmp_path / "ours.safetensors")
    target = micro(num_classes=3, in_chans=3)
    assert load_pretrained(target, tmp_path / "ours.safetensors") == []
    assert torch.equal(target.head.weight, source.head.weight)
    stem = source.downsample_layers[0][0].weight  # (out, 1, 3, 3) repeated over 3 channels, scaled by 1/3
    torch.testing.assert_close(target.downsample_layers[0][0].weight, stem.repeat(1, 3, 1, 1) / 3)


def test_another_architecture_is_refused_with_the_keys(tmp_path):
    save_weights(micro(num_classes=3, embed_dim=[8, 16, 24, 32]), tmp_path / "wider.safetensors")
    expected = r"does not fit BiFormer: shapes differ \[.downsample_layers.2.0.bias: file \(24,\) vs model \(16,\)"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(micro(num_classes=3), tmp_path / "wider.safetensors")
    with pytest.raises(FileNotFoundError):
        load_pretrained(micro(num_classes=3), tmp_path / "absent.pth")


def test_trainer_fine_tunes_a_fashion_mnist_run_on_new_classes(tmp_path):
    fashion = make_fashion_mnist(tmp_path / "fm", train=16, test=10)
    first = load_config((micro_options(data_dir=str(fashion), epochs=1, download=False), "test"))
    with Trainer(first, run_dir=tmp_path / "first") as trainer:
        trainer.fit()
    checkpoint = tmp_path / "first" / "checkpoints" / "last.safetensors"
    pretrained = timm.create_model("biformer_nano", num_classes=10, in_chans=1, **MICRO_MODEL_KWARGS)
    biformer.load_checkpoint(pretrained, checkpoint)

    folder = make_image_folder(tmp_path / "folder")
    second = load_config((micro_options(dataset="imagefolder", data_dir=str(folder), in_chans=1, epochs=1,
                                        pretrained=str(checkpoint)), "test"))
    with Trainer(second, run_dir=tmp_path / "second") as trainer:
        model = trainer.model
        assert model.head.weight.shape == (3, 16)
        assert torch.equal(model.stages[1][0].mlp[0].weight, pretrained.stages[1][0].mlp[0].weight)
        trainer.fit()
