"""Training options: every bad value is refused in one line naming the option (before any data is read)."""

from __future__ import annotations

import pytest

from biformer.cli import main
from train.synthetic import as_flags, make_image_folder, micro_options


@pytest.mark.parametrize("arguments, named", [
    (["--lr", "nan"], "option 'lr'"),
    (["--lr", "inf"], "option 'lr'"),
    (["--lr-base", "-1"], "option 'lr_base'"),
    (["--seed", "-1"], "option 'seed'"),
    (["--time-limit", "nan"], "option 'time_limit'"),
    (["--weight-decay", "-5"], "option 'weight_decay'"),
    (["--mean", "[a, b, c]"], "option 'mean'"),
    (["--std", "[0.5, 0, 0.5]"], "option 'std'"),
    (["--crop-pct", "0"], "option 'crop_pct'"),
    (["--crop-pct", "-1"], "option 'crop_pct'"),
    (["--scale", "[a, b]"], "option 'scale'"),
    (["--interpolation", "foo"], "option 'interpolation'"),
    (["--device", "foo"], "option 'device'"),
    (["--name", "x" * 300], "option 'name'"),
    (["--warmup-epochs", "-1"], "option 'warmup_epochs'"),
    (["--model-kwargs", "{pretrained: true}"], "option 'model_kwargs'"),
])
def test_bad_training_options_are_named_in_one_line(tmp_path, monkeypatch, capsys, arguments, named):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("biformer train: error: ") and named in err, err


def image_folder_run(tmp_path, **options):
    return main(["train", *as_flags(micro_options(dataset="imagefolder", output=str(tmp_path / "runs"), workers=0,
                                                  epochs=1, **options))])


def test_mean_of_another_length_than_the_channels_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    assert image_folder_run(tmp_path, data_dir=str(data), mean=[0.5, 0.5]) == 2
    err = capsys.readouterr().err.strip()
    assert "option 'mean': expected 1 or 3 values (one per channel), got 2" in err


def test_batch_of_one_in_training_names_the_option(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    assert image_folder_run(tmp_path, data_dir=str(data), batch_size=1) == 2
    assert "option 'batch_size'" in capsys.readouterr().err


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    import shutil

    for split in ("train", "val"):
        for name in ("green", "blue"):
            shutil.rmtree(data / split / name)
    assert image_folder_run(tmp_path, data_dir=str(data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least 2 classes, found 1 (['red'])" in err


def test_csv_with_a_utf8_bom_keeps_its_header(tmp_path):
    from PIL import Image

    from biformer.train.data import CsvImageDataset

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "train.csv").write_text("path,label\na.png,cat\nb.png,dog\n", encoding="utf-8-sig")
    dataset = CsvImageDataset(tmp_path / "train.csv")
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 2
