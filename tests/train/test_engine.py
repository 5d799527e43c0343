"""The training engine on tiny generated data: run folder, recipe knobs, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from biformer.train import ConfigError, Trainer, load_config
from biformer.train import engine as engine_module
from biformer.train.checkpoints import read_metadata
from biformer.train.classification import ClassificationTask
from biformer.train.engine import lr_for
from train.synthetic import make_csv_dataset, make_fashion_mnist, make_image_folder, micro_options


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"))


def make_config(tmp_path, data_root, **overrides):
    values = micro_options(dataset="imagefolder", data_dir=str(data_root), output=str(tmp_path / "runs"), name="run")
    values.update(overrides)
    return load_config((values, "test"))


def test_run_folder_holds_config_metrics_plot_and_checkpoints(tmp_path, folder_data):
    config = make_config(tmp_path, folder_data, epochs=3, batch_size=4)
    with Trainer(config) as trainer:
        summary = trainer.fit()
    run = tmp_path / "runs" / "run"
    assert trainer.run_dir == run
    # the resolved configuration, readable back into the same configuration
    assert load_config((yaml.safe_load((run / "config.yaml").read_text()), "saved")) == config
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert {"train_loss", "lr", "top1", "top5", "loss", "time_s", "train_images_per_s"} <= set(rows[0])
    document = json.loads((run / "metrics.json").read_text())
    assert document["epochs_completed"] == 3 and len(document["final"]["per_class_top1"]) == 3
    assert document["final"]["samples"] == 12  # every validation image once
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the data is trivially separable: the micro model must learn it
    assert float(rows[-1]["top1"]) == 100.0, rows
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # checkpoints: the last weights are the model's, described for eval/predict
    last = load_file(str(run / "checkpoints" / "last.safetensors"))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(last[key], value), key
    description = read_metadata(run / "checkpoints" / "best.safetensors")
    assert description["data"]["class_names"] == ["blue", "green", "red"]
    assert description["config"]["model"] == "biformer_nano" and description["top1"] == summary["best"]
    assert (run / "checkpoints" / "training-state.pt").is_file()
    assert not list(run.rglob("*.tmp"))


def test_csv_dataset_and_grayscale_fashion_mnist(tmp_path):
    csv_root = make_csv_dataset(tmp_path / "csv")
    config = make_config(tmp_path, csv_root, dataset="csv", epochs=1, name="csv")
    with Trainer(config) as trainer:
        trainer.fit()
    assert trainer.last_metrics["samples"] == 9
    fashion = make_fashion_mnist(tmp_path / "fm", train=16, test=10)
    config = make_config(tmp_path, fashion, dataset="fashion-mnist", epochs=1, name="fm", download=False)
    with Trainer(config) as trainer:
        trainer.fit()
    assert trainer.model.downsample_layers[0][0].weight.shape[1] == 1  # one input channel
    assert trainer.data.info["class_names"][9] == "Ankle boot" and trainer.last_metrics["samples"] == 10


def test_lr_is_scaled_by_the_global_batch(tmp_path, folder_data):
    config = make_config(tmp_path, folder_data, lr=None, lr_base=1e-3, lr_base_size=512, batch_size=8, accum_steps=2)
    assert lr_for(config, world_size=4) == pytest.approx(1e-3 * 8 * 4 * 2 / 512)
    assert lr_for(make_config(tmp_path, folder_data, lr=0.5), world_size=4) == 0.5
    with Trainer(config) as trainer:
        assert trainer.lr == pytest.approx(1e-3 * 16 / 512) and trainer.global_batch == 16


def test_weight_decay_skips_no_weight_decay_biases_and_norms(tmp_path, folder_data):
    with Trainer(make_config(tmp_path, folder_data, weight_decay=0.05)) as trainer:
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        decay = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        no_decay = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert type(trainer.optimizer).__name__ == "AdamW"
    assert trainer.model.no_weight_decay() <= no_decay
    assert any(".pos_embed.weight" in name for name in trainer.model.no_weight_decay())
    assert "head.weight" in decay and "stages.0.0.mlp.0.weight" in decay
    assert "head.bias" in no_decay and "stages.0.0.norm1.weight" in no_decay
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())


def test_cosine_schedule_with_warmup(tmp_path, folder_data):
    config = make_config(tmp_path, folder_data, epochs=4, warmup_epochs=1.0, warmup_lr=1e-5, min_lr=1e-5, lr=1e-2)
    seen = []
    with Trainer(config) as trainer:
        trainer.step_callbacks.append(lambda t: seen.append(t.optimizer.param_groups[0]["lr"]))
        trainer.fit()
    steps_per_epoch = trainer.updates_per_epoch  # 24 images / batch 8 = 3
    assert steps_per_epoch == 3 and len(seen) == 12
    warmup = seen[: steps_per_epoch - 1]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))  # linear warm-up rises
    decay = seen[steps_per_epoch:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and seen[-1] < 2e-3  # cosine falls towards min_lr


def test_accumulation_counts_optimizer_steps(tmp_path, folder_data):
    with Trainer(make_config(tmp_path, folder_data, batch_size=4, accum_steps=3, epochs=1)) as trainer:
        trainer.fit()
    assert trainer.updates_per_epoch == 2 and trainer.step == 2  # 24 images / (4 x 3)


def test_gradient_clipping_bounds_the_norm(tmp_path, folder_data, monkeypatch):
    norms = []
    original = engine_module.dispatch_clip_grad

    def spy(parameters, value, mode="norm"):
        parameters = list(parameters)
        original(parameters, value, mode=mode)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))

    monkeypatch.setattr(engine_module, "dispatch_clip_grad", spy)
    with Trainer(make_config(tmp_path, folder_data, clip_grad=0.01, epochs=1)) as trainer:
        trainer.fit()
    assert len(norms) == trainer.step and all(norm <= 0.01 + 1e-6 for norm in norms)


def test_bf16_autocast_and_gradient_checkpointing(tmp_path, folder_data, monkeypatch):
    seen = []
    original = ClassificationTask.training_loss

    def spy(self, model, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "training_loss", spy)
    # 32 px, not 16: torch's CPU bf16 convolution returns garbage weight gradients for a 1 x 1 input map
    # (stride 2, padding 1: the last downsampling conv at 16 px), whatever the data
    config = make_config(tmp_path, folder_data, precision="bf16", grad_checkpointing=True, epochs=1, input_size=32)
    with Trainer(config) as trainer:
        assert all(stage.grad_checkpointing for stage in trainer.model.stages)
        trainer.fit()
    assert seen and all(entry == (True, torch.bfloat16) for entry in seen)
    assert torch.isfinite(torch.tensor(trainer.history[-1]["train_loss"]))


def test_timm_recipe_pieces_are_built(tmp_path, folder_data):
    config = make_config(tmp_path, folder_data, mixup=0.8, cutmix=1.0, model_ema=True, drop_path=0.1, reprob=0.25,
                         auto_augment="rand-m9-mstd0.5-inc1-mmax9", smoothing=0.1)
    with Trainer(config) as trainer:
        from timm.data import Mixup
        from timm.layers import DropPath
        from timm.utils import ModelEmaV3

        assert isinstance(trainer.task.mixup, Mixup) and trainer.task.mixup.label_smoothing == 0.1
        assert isinstance(trainer.ema, ModelEmaV3)
        assert any(isinstance(m, DropPath) for m in trainer.model.modules())
        transform = repr(trainer.data.train.transform)
        assert "RandAugment" in transform and "RandomErasing" in transform
        trainer.fit()
    assert "ema_top1" in trainer.history[-1] and (trainer.run_dir / "checkpoints" / "last-ema.safetensors").is_file()


def test_existing_run_is_not_overwritten(tmp_path, folder_data):
    config = make_config(tmp_path, folder_data, epochs=1)
    with Trainer(config) as trainer:
        trainer.fit()
    with pytest.raises(FileExistsError, match="already holds a run; continue it with --resume"):
        Trainer(config)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(config, resume=True, run_dir=tmp_path / "elsewhere")


def test_batch_larger_than_the_dataset(tmp_path, folder_data):
    with pytest.raises(ConfigError, match="more than the 24 training samples"):
        Trainer(make_config(tmp_path, folder_data, batch_size=32))


def test_unknown_model_dataset_and_kwargs(tmp_path, folder_data):
    with pytest.raises(ConfigError, match="unknown timm model 'biformer_huge'"):
        Trainer(make_config(tmp_path, folder_data, model="biformer_huge"))
    with pytest.raises(ConfigError, match="expected one of"):
        Trainer(make_config(tmp_path, folder_data, dataset="coco"))
    with pytest.raises(ConfigError, match="option 'model_kwargs': cannot build biformer_nano"):
        Trainer(make_config(tmp_path, folder_data, model_kwargs={"n_win": 1, "topks": [5, 1, 1, -2]}))
    with pytest.raises(ConfigError, match="'data_dir': required"):
        Trainer(make_config(tmp_path, folder_data, data_dir=None))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, folder_data, monkeypatch):
    monkeypatch.setattr(ClassificationTask, "training_loss",
                        lambda self, model, batch: (model(batch[0]).sum() * float("nan"), len(batch[1])))
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 1"):
        with Trainer(make_config(tmp_path, folder_data)) as trainer:
            trainer.fit()
