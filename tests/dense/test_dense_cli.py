"""``biformer train --task segmentation | detection`` on the built-in scenes: run folder, exact resume, eval of
the checkpoint, two processes under torchrun (gloo), the time budget, and one-line errors for bad options.

The scenes are composed from the session's Fashion-MNIST lookalike, found where the command looks by default
(``fashion_mnist_on_search_path``); the bad-option tests run without any dataset: options are checked first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_helpers import write_coco, write_mask_folder
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.functional import to_tensor

from biformer.cli import build_parser, main
from biformer.cli.train import given_config_values
from biformer.train import ConfigError, TrainConfig, Trainer, load_config
from biformer.train.config import config_fields, option_default
from biformer.train.inference import load_for_inference

# A backbone smaller than the "shallow" preset (model_kwargs override the preset's arguments).
TINY_BACKBONE = {"depth": [1, 1, 1, 1], "embed_dim": [16, 16, 32, 32], "qk_dims": [16, 16, 32, 32], "head_dim": 16,
                 "topks": [1, 4, 4, -2], "mlp_ratios": [2, 2, 2, 2]}


def tiny_flags(task: str, output: Path, name: str, **overrides: object) -> list[str]:
    values = dict(task=task, train_scenes=8, val_scenes=5, input_size=64, batch_size=4, epochs=2, head_channels=16,
                  model_kwargs=TINY_BACKBONE, progress=False, output=str(output), name=name)
    values.update(overrides)
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


class Stop(Exception):
    """Raised by a step callback to interrupt a run."""


def config_of(flags: list[str]) -> TrainConfig:
    """The configuration ``biformer train FLAGS`` resolves."""
    return load_config((given_config_values(build_parser().parse_args(["train", *flags])), "flags"))


def _interrupted_then_resumed(flags: list[str], run: Path, stop_at_step: int) -> None:
    """Run the configuration in-process until ``stop_at_step``, then continue it with ``biformer train --resume``."""
    config = config_of(flags)

    def stop(trainer: Trainer) -> None:
        if trainer.step == stop_at_step:
            raise Stop

    with Trainer(config, run_dir=run) as trainer:
        trainer.step_callbacks.append(stop)
        with pytest.raises(Stop):
            trainer.fit()
    assert main(["train", "--resume", str(run)]) == 0


@pytest.mark.parametrize("task, architecture", [("segmentation", "upernet"), ("detection", "retinanet")])
def test_train_resume_and_eval(tmp_path, capsys, task, architecture, fashion_mnist_on_search_path):
    flags = tiny_flags(task, tmp_path, "straight", architecture=architecture)
    assert main(["train", *flags]) == 0
    run = tmp_path / "straight"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "metrics.json",
                                                      "metrics.png", "tensorboard"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors",
                                                                        "training-state.pt"]
    document = json.loads((run / "metrics.json").read_text())
    main_metric = "mIoU" if task == "segmentation" else "mAP@0.5"
    assert document["main_metric"] == main_metric and document["steps"] == 4  # 8 scenes, batch 4, 2 epochs
    assert 0.0 <= document["final"][main_metric] <= 1.0

    # interrupted in epoch 2 and resumed: the same weights as the uninterrupted run
    interrupted = tmp_path / "interrupted"
    _interrupted_then_resumed(tiny_flags(task, tmp_path, "interrupted", architecture=architecture), interrupted, 3)
    expected, actual = (load_file(str(r / "checkpoints" / "last.safetensors")) for r in (run, interrupted))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert any(key.startswith("auxiliary_head.") for key in expected) == (architecture == "upernet")  # --aux-head

    # eval rebuilds the model from the checkpoint and gives the run's final metrics
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoints" / "last.safetensors"), "--output", str(tmp_path / "eval"),
                 "--no-progress"]) == 0
    assert main_metric in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == task and report["architecture"] == architecture
    assert report[main_metric] == pytest.approx(document["final"][main_metric], abs=1e-6)

    _check_predict(run / "checkpoints" / "last.safetensors", task, tmp_path, capsys)


def _check_predict(checkpoint: Path, task: str, tmp_path: Path, capsys) -> None:
    """``biformer predict`` on a dense checkpoint: what it prints and draws is the model's own output."""
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "scene.png")
    output = tmp_path / "predictions"
    capsys.readouterr()
    options = ["--checkpoint", str(checkpoint), "--output", str(output), "--json"]
    assert main(["predict", str(tmp_path / "scene.png"), *options, "--score-threshold", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model = load_for_inference(checkpoint).model.eval()
    pixels = to_tensor(image)  # (3, 48, 40)
    with torch.no_grad():
        if task == "segmentation":
            expected = model(pixels[None]).argmax(dim=1)[0]  # (48, 40)
            written = torch.from_numpy(np.array(Image.open(output / "scene-classes.png")))
            assert torch.equal(written.long(), expected)
            assert sum(item["fraction"] for item in printed["classes"]) == pytest.approx(1.0)
            assert Image.open(output / "scene-overlay.png").size == (40, 48)
        else:
            expected = model([pixels])[0]
            assert [item["score"] for item in printed["objects"]] == pytest.approx(
                sorted(expected["scores"].tolist(), reverse=True))
            assert Image.open(output / "scene-detections.png").size == (40, 48)
    twice = [str(tmp_path / "scene.png"), str(tmp_path / "other" / "scene.png")]
    for images, bad, message in (
        (twice[:1], ["--score-threshold", "2"], "--score-threshold: expected a score in [0, 1], got 2.0"),
        (twice, [], "several images are named ['scene']"),
    ):
        assert main(["predict", *images, *options, *bad]) == 2
        assert message in capsys.readouterr().err


def test_coco_and_mask_folder_data_through_the_command(tmp_path, capsys):
    """Your own data: COCO-format detection (DATA/SPLIT + DATA/annotations/instances_SPLIT.json) and an
    image/mask folder for segmentation (DATA/images/SPLIT + DATA/annotations/SPLIT); trained and evaluated."""
    coco = tmp_path / "coco"
    for split in ("train", "val"):
        (coco / split).mkdir(parents=True)
        (coco / "annotations").mkdir(exist_ok=True)
        write_coco(coco / split)
        (coco / split / "instances.json").rename(coco / "annotations" / f"instances_{split}.json")
    flags = tiny_flags("detection", tmp_path, "coco-run", architecture="retinanet", dataset="coco",
                       data_dir=str(coco), epochs=1, batch_size=2)
    assert main(["train", *flags]) == 0
    document = json.loads((tmp_path / "coco-run" / "metrics.json").read_text())
    assert document["steps"] == 1 and 0.0 <= document["final"]["mAP@0.5"] <= 1.0  # 2 images, batch 2
    assert main(["eval", str(tmp_path / "coco-run" / "checkpoints" / "last.safetensors"), "--output",
                 str(tmp_path / "coco-eval"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "coco-eval" / "eval.json").read_text())["task"] == "detection"

    folder = tmp_path / "ade"
    for split in ("training", "validation"):
        write_mask_folder(tmp_path, images=folder / "images" / split, masks=folder / "annotations" / split)
    flags = tiny_flags("segmentation", tmp_path, "mask-run", dataset="maskfolder", data_dir=str(folder),
                       num_classes=3, train_split="training", val_split="validation", epochs=1, batch_size=2)
    assert main(["train", *flags]) == 0
    document = json.loads((tmp_path / "mask-run" / "metrics.json").read_text())
    assert document["steps"] == 1 and 0.0 <= document["final"]["mIoU"] <= 1.0
    assert len(document["final"]["per_class_IoU"]) == 3


def test_two_processes_gather_detections(tmp_path, capsys, fashion_mnist_on_search_path):
    """Under torchrun each process evaluates 3 or 2 of the 5 scenes; the gathered mAP is the one-process one."""
    # with a time budget (not reached) every step also agrees on the clock across the processes
    flags = tiny_flags("detection", tmp_path, "ddp", architecture="maskrcnn", epochs=1, time_limit=30.0)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "biformer",
               "train", *flags]
    process = subprocess.run(command, capture_output=True, text=True, timeout=240,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stdout + process.stderr
    assert "2 process(es)" in process.stdout and process.stdout.count("epoch 1/1: train loss") == 1
    final = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["final"]
    assert final["images"] == 5

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ddp" / "checkpoints" / "last.safetensors"), "--output",
                 str(tmp_path / "eval"), "--no-progress"]) == 0
    single = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("mAP", "mAP@0.5", "mask_mAP", "images"):
        assert single[key] == pytest.approx(final[key], abs=1e-6), key


def test_time_limit_stops_with_a_final_evaluation_and_checkpoint(tmp_path, fashion_mnist_on_search_path):
    flags = tiny_flags("segmentation", tmp_path, "budget", epochs=50, time_limit=1e-4)  # 6 ms: one step
    assert main(["train", *flags]) == 0
    document = json.loads((tmp_path / "budget" / "metrics.json").read_text())
    assert document["stopped_by_time_limit"] is True
    assert document["epochs_completed"] == 1 and document["steps"] == 1
    assert "mIoU" in document["final"] and (tmp_path / "budget" / "checkpoints" / "best.safetensors").is_file()


def test_time_limit_schedule_follows_the_budget(tmp_path, fashion_mnist_on_search_path):
    config = config_of(tiny_flags("segmentation", tmp_path, "schedule", epochs=10, time_limit=10.0))
    with Trainer(config, run_dir=tmp_path / "schedule") as trainer:
        planned = config.epochs * trainer.updates_per_epoch  # 10 epochs x 2 steps
        trainer._clock = (trainer._clock[0], 0.3 * trainer.time_budget)  # 30% of the budget already used
        assert trainer._schedule_position() == int(0.3 * planned)
        assert not trainer.stopped_by_time_limit
        trainer._clock = (trainer._clock[0], 1.01 * trainer.time_budget)
        assert trainer._schedule_position() == planned and trainer.stopped_by_time_limit


def test_task_defaults_apply_beneath_flags():
    config = load_config(({"task": "segmentation"}, "flags"))
    assert (config.dataset, config.model, config.model_kwargs, config.input_size) == ("scenes", "shallow", {}, 128)
    config = load_config(({"task": "detection", "input_size": 96, "model": "micro"}, "flags"))
    assert (config.dataset, config.input_size, config.model) == ("scenes", 96, "micro")
    assert load_config(({}, "flags")).dataset == "fashion-mnist"  # classification keeps its own


@pytest.mark.parametrize("overrides, message", [
    (dict(architecture="mask_rcnn"), "option 'architecture': --task detection expects one of"),
    (dict(dataset="coco"), "option 'data_dir': required for dataset 'coco'"),
    (dict(dataset="maskfolder"), "option 'dataset': --task detection expects one of"),
    (dict(dataset="coco", data_dir="/nonexistent/coco"), "dataset coco: image_dir: no such folder: /nonexistent/coco"),
    (dict(model="resnet50"), "option 'model': expected a backbone preset"),
    (dict(model_kwargs={"n_win": "many"}), "option 'model_kwargs'"),
    (dict(train_scenes=0), "option 'train_scenes': expected an integer >= 1"),
    (dict(time_limit=-1.0), "option 'time_limit': expected None or a positive number"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, overrides, message):
    assert main(["train", *tiny_flags("detection", tmp_path, "bad", **overrides)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error


@pytest.mark.parametrize("task, option, value", [
    ("segmentation", "mixup", 0.8), ("detection", "hflip", 0.0), ("classification", "architecture", "upernet"),
    ("detection", "aux_head", False), ("detection", "num_classes", 5), ("classification", "head_channels", 32),
])
def test_options_another_task_would_read_are_refused(task, option, value):
    with pytest.raises(ConfigError, match=f"option '{option}': not used by task '{task}'"):
        load_config(({"task": task, option: value}, "flags"))
    # the option's default value (as in an older run's config.yaml, which listed every option) is accepted
    default = option_default(next(f for f in config_fields() if f.name == option))
    assert option not in load_config(({"task": task, option: default}, "flags")).to_dict()


def test_maskfolder_needs_num_classes(tmp_path, capsys):
    flags = tiny_flags("segmentation", tmp_path, "bad", dataset="maskfolder", data_dir=str(tmp_path))
    assert main(["train", *flags]) == 2
    assert "option 'num_classes': required for dataset 'maskfolder'" in capsys.readouterr().err
