"""The shipped recipes (biformer/configs): listed, loaded, validated, holding the authors' values, and each one
trains two steps at tiny scale with its data options pointed at a small local dataset."""

from __future__ import annotations

import pytest

from biformer.cli import main
from biformer.train import ConfigError, Trainer, load_config, load_yaml
from biformer.train.recipes import list_configs, resolve_config
from dense.dense_helpers import write_coco, write_mask_folder
from train.synthetic import MICRO_MODEL_KWARGS, make_image_folder

IMAGENET = ("imagenet/biformer_tiny", "imagenet/biformer_small", "imagenet/biformer_base", "imagenet/biformer_stl")
DENSE = ("coco/maskrcnn_1x_biformer_small", "coco/retinanet_1x_biformer_small", "ade20k/upernet_160k_biformer_small")
# The authors' values, read off rayleizhu/BiFormer main.py (defaults) and scripts/train.sh / README (per model)
AUTHORS_IMAGENET = dict(epochs=300, opt="adamw", lr_base=5e-4, lr_base_size=512, weight_decay=0.05, sched="cosine",
                        warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, model_ema=True, model_ema_decay=0.99996,
                        repeated_aug=3, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, batch_size=128,
                        input_size=224, interpolation="bicubic", precision="fp16")
AUTHORS_DROP_PATH = {"imagenet/biformer_small": 0.15, "imagenet/biformer_stl": 0.1}
# object_detection/configs/coco/*.1x.biformer_small.py, semantic_segmentation/configs/ade20k/upernet.biformer_small.py
AUTHORS_DENSE = {
    "coco/maskrcnn_1x_biformer_small": dict(lr_base=1e-4, lr_base_size=16, weight_decay=0.05, drop_path=0.2,
                                            epochs=12, decay_milestones=[8, 11], model_kwargs={"n_win": 16}),
    "coco/retinanet_1x_biformer_small": dict(lr_base=1e-4, lr_base_size=16, weight_decay=1e-4, drop_path=0.2,
                                             epochs=12, decay_milestones=[8, 11], model_kwargs={"n_win": 16}),
    "ade20k/upernet_160k_biformer_small": dict(lr_base=6e-5, lr_base_size=16, weight_decay=0.01, drop_path=0.3,
                                               sched="poly", decay_rate=1.0, model_kwargs={"n_win": 8}),
}


def recipe(name: str) -> dict:
    return load_yaml(resolve_config(name))


def test_every_recipe_is_listed_and_loads(capsys):
    assert list_configs() == sorted(IMAGENET + DENSE)
    assert main(["train", "--list-configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in IMAGENET + DENSE)
    for name in IMAGENET + DENSE:
        config = load_config((recipe(name), name))  # validates
        assert config.model.startswith("biformer_")


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipes_hold_the_authors_values(name):
    config = load_config((recipe(name), name))
    assert {key: getattr(config, key) for key in AUTHORS_IMAGENET} == AUTHORS_IMAGENET
    assert config.auto_augment.startswith("rand-m9-mstd0.5-inc1")  # the authors' policy (+ our mmax9 cap)
    assert config.model == name.split("/")[1]
    if name in AUTHORS_DROP_PATH:
        assert config.drop_path == AUTHORS_DROP_PATH[name]


@pytest.mark.parametrize("name", DENSE)
def test_dense_recipes_hold_the_authors_values(name):
    config = load_config((recipe(name), name))
    assert {key: getattr(config, key) for key in AUTHORS_DENSE[name]} == AUTHORS_DENSE[name]
    assert config.precision == "fp16" and config.opt == "adamw" and config.model == "biformer_small"


def _two_steps(values: dict, tmp_path) -> Trainer:
    values.update(epochs=1, threads=1, progress=False, tensorboard=False, output=str(tmp_path), name="run",
                  checkpoint_minutes=None)
    with Trainer(load_config(*values.pop("_layers"), (values, "test"))) as trainer:
        trainer.fit()
    return trainer


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipe_trains_two_steps_on_a_local_image_folder(name, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))  # 12 training images, batch 6: 2 steps
    values = dict(_layers=[(recipe(name), name)], data_dir=str(data), model="biformer_nano",
                  model_kwargs=MICRO_MODEL_KWARGS, input_size=32, batch_size=6, workers=0)
    trainer = _two_steps(values, tmp_path)
    assert trainer.step == 2 and trainer.config.precision == "fp16" and trainer.guard.enabled
    assert trainer.config.repeated_aug == 3 and trainer.ema is not None and trainer.task.mixup is not None


@pytest.mark.parametrize("name", DENSE)
def test_dense_recipe_trains_two_steps_on_local_data(name, tmp_path):
    tiny = dict(depth=[1, 1, 1, 1], embed_dim=[32, 32, 64, 64], qk_dims=[32, 32, 64, 64], head_dim=32,
                topks=[1, 4, 4, -2], mlp_ratios=[2, 2, 2, 2], n_win=2)
    values = dict(_layers=[(recipe(name), name)], model_kwargs=tiny, input_size=64, head_channels=16, batch_size=1,
                  workers=0)
    if name.startswith("coco/"):
        data = tmp_path / "coco"
        for split in ("train2017", "val2017"):
            (data / split).mkdir(parents=True)
            (data / "annotations").mkdir(exist_ok=True)
            write_coco(data / split)
            (data / split / "instances.json").rename(data / "annotations" / f"instances_{split}.json")
    else:
        data = tmp_path / "ade"
        for split in ("training", "validation"):  # 4 images, the recipe's batch of 2: UperNet's pooling BatchNorm
            write_mask_folder(tmp_path, sizes=((20, 30), (24, 16)) * 2, images=data / "images" / split,
                              masks=data / "annotations" / split)  # needs more than one value per channel
        values.update(num_classes=3, batch_size=2)
    values["data_dir"] = str(data)
    trainer = _two_steps(values, tmp_path)
    assert trainer.step == 2 and trainer.guard.enabled


def test_unknown_recipe_names_the_shipped_ones(capsys):
    assert main(["train", "--config", "imagenet/biformer_huge"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("biformer train: error: --config: 'imagenet/biformer_huge' is neither a file nor a "
                            "shipped recipe; shipped recipes (biformer train --list-configs): ade20k/upernet_160k")
    with pytest.raises(ConfigError):
        resolve_config("coco/none")
