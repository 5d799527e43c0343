"""The training configuration: defaults < YAML file < flags, type and range checks, round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from biformer.train.config import (
    ConfigError,
    TrainConfig,
    config_fields,
    load_config,
    load_yaml,
    parse_flag_value,
    save_config,
)


def field(name: str) -> dataclasses.Field:
    return next(f for f in config_fields() if f.name == name)


def test_defaults_are_the_quick_start():
    config = load_config()
    assert (config.dataset, config.model, config.task) == ("fashion-mnist", "biformer_nano", "classification")
    assert config.model_kwargs == {"n_win": 2, "topks": [2, 2, 4, -2]}
    # mutable defaults are not shared between instances
    config.model_kwargs["n_win"] = 9
    assert TrainConfig().model_kwargs["n_win"] == 2


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr-base: 0.001\nmodel_kwargs: {n_win: 4}\nscale: [0.5, 1.0]\n")
    config = load_config((load_yaml(path), str(path)), ({"epochs": 5}, "flags"))
    assert config.epochs == 5  # the flag wins
    assert config.lr_base == 0.001 and config.model_kwargs == {"n_win": 4} and config.scale == [0.5, 1.0]


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(({"epochs": 2, "mixup": 0.8, "clip_grad": 1.0, "mean": [0.5]}, "test"))
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config((load_yaml(path), str(path))) == config
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("epoch: 3\n", "unknown option(s) ['epoch']"),
        ("epochs: three\n", "option 'epochs' expects int"),
        ("model_ema: 1\n", "option 'model_ema' expects bool"),
        ("epochs: true\n", "option 'epochs' expects int"),
        ("dataset: null\n", "option 'dataset' cannot be empty"),
    ],
)
def test_bad_yaml_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as error:
        load_config((load_yaml(path), str(path)))
    assert message in str(error.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_yaml(tmp_path / "absent.yaml")


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config((load_yaml(path), str(path))) == TrainConfig()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "'epochs': expected an integer >= 1, got 0"),
        ({"batch_size": -4}, "'batch_size'"),
        ({"precision": "fp8"}, "'precision': expected one of ('fp32', 'bf16', 'fp16'), got 'fp8'"),
        ({"mixup": 0.8, "batch_size": 7}, "mixup/cutmix need an even batch size, got 7"),
        ({"hflip": 1.5}, "'hflip': expected a probability"),
        ({"smoothing": 1.0}, "'smoothing'"),
        ({"scale": [0.9, 0.1]}, "'scale'"),
        ({"lr": -1.0}, "'lr': expected None or a positive number"),
        ({"workers": -1}, "'workers'"),
        ({"model_ema_decay": 1.0}, "'model_ema_decay'"),
        ({"input_size": 0}, "'input_size'"),
    ],
)
def test_out_of_range_values_are_named(values, message):
    with pytest.raises(ConfigError) as error:
        load_config((values, "flags"))
    assert message in str(error.value)


def test_flag_values_are_parsed_by_type():
    assert parse_flag_value(field("epochs"), "4") == 4
    assert parse_flag_value(field("lr"), "1e-3") == 1e-3
    assert parse_flag_value(field("lr"), "none") is None
    assert parse_flag_value(field("clip_grad"), "2") == 2.0
    assert parse_flag_value(field("model_kwargs"), "{n_win: 4, topks: [1, 2, 3, -2]}") == {
        "n_win": 4, "topks": [1, 2, 3, -2]}
    assert parse_flag_value(field("scale"), "[0.5, 1]") == [0.5, 1]
    assert parse_flag_value(field("auto_augment"), "rand-m9-mstd0.5") == "rand-m9-mstd0.5"


@pytest.mark.parametrize("name, text", [("epochs", "2.5"), ("lr", "fast"), ("model_kwargs", "[1, 2]"),
                                        ("scale", "{a: 1}"), ("epochs", "none")])
def test_bad_flag_values_are_named(name, text):
    with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
        parse_flag_value(field(name), text)


def test_every_field_has_help():
    for config_field in config_fields():
        assert config_field.metadata["help"], config_field.name


def test_saved_yaml_is_plain(tmp_path):
    path = save_config(TrainConfig(), tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["model"] == "biformer_nano"


def _every_option_at_its_default(task: str) -> dict:
    """A config.yaml as the code before per-task options wrote it: every option of every task, flat."""
    from biformer.train.config import option_default

    values = {f.name: option_default(f) for f in config_fields()}
    values.update(load_config(({"task": task}, "flags")).to_dict())
    return values


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_old_flat_config_files_still_load(tmp_path, task):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_every_option_at_its_default(task), sort_keys=False))
    config = load_config((load_yaml(path), str(path)))
    assert config == load_config(({"task": task}, "flags"))
    # written now: the shared options, then only the task's own (another task's would be refused on reading)
    saved = yaml.safe_load(save_config(config, tmp_path / "new.yaml").read_text())
    own = {f.name for f in dataclasses.fields(type(config.options))}
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig) if f.name != "options"} | own
    assert load_config((saved, "new.yaml")) == config


def test_task_options_live_in_the_task_dataclass():
    from biformer.dense.engine_tasks import DenseOptions
    from biformer.train.classification import ClassificationOptions

    config = load_config(({"mixup": 0.8, "batch_size": 4}, "flags"))
    assert isinstance(config.options, ClassificationOptions) and config.options.mixup == 0.8
    assert config.mixup == 0.8  # read through the configuration as before
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert "mixup" not in shared and "architecture" not in shared
    dense = load_config(({"task": "detection", "architecture": "retinanet"}, "flags"))
    assert isinstance(dense.options, DenseOptions) and dense.options.architecture == "retinanet"
    with pytest.raises(AttributeError, match="mixup"):
        dense.mixup  # noqa: B018 - not an option of detection
    with pytest.raises(ConfigError, match="option 'crop_pct': expected a fraction"):
        load_config(({"crop_pct": 0.0}, "flags"))  # the task's own checks run
    with pytest.raises(ConfigError, match="option 'val_scenes': expected an integer >= 1"):
        load_config(({"task": "segmentation", "val_scenes": 0}, "flags"))
