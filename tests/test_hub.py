"""Sharing: Hub-layout folders (timm local-dir and hf-hub from a local cache, no network), loading by name +
weight file, and the repository's torch.hub entry points."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch

import biformer
from biformer.hub import load_model, load_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
# a non-default architecture: micro widths, custom depth, 4 x 4 regions, other top-k, 10 classes
CUSTOM = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], n_win=4,
              topks=[2, 3, 5, -2], num_classes=10)


def perturbed(model):
    """Non-default weights and BatchNorm statistics, so a load that silently kept fresh ones would show."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def custom():
    return perturbed(timm.create_model("biformer_tiny", drop_path_rate=0.1, **CUSTOM))


def same_outputs(a, b):
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_round_trip_rebuilds_a_custom_model(custom, tmp_path):
    folder = save_pretrained(custom, tmp_path / "custom", label_names=[f"class {i}" for i in range(10)])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "biformer_tiny" and config["num_classes"] == 10
    architecture = {key: value for key, value in CUSTOM.items() if key != "num_classes"}
    assert {key: config["model_args"][key] for key in architecture} == architecture
    assert "num_classes" not in config["model_args"]  # only at the top: transformers passes its own
    assert "drop_path_rate" not in config["model_args"]  # training-only
    assert config["label_names"][3] == "class 3"
    for loaded in (load_pretrained(folder), timm.create_model(f"local-dir:{folder}", pretrained=True)):
        assert loaded.stages[0][0].attn.n_win == 4 and loaded.stages[2][1].attn.topk == 5
        same_outputs(custom, loaded)
    fine_tune = load_pretrained(folder, num_classes=3, drop_path_rate=0.2)
    assert fine_tune.head.out_features == 3 and fine_tune.stages[2][1].drop_path.drop_prob > 0
    torch.testing.assert_close(fine_tune.stages[1][0].attn.qkv.qkv.weight, custom.stages[1][0].attn.qkv.qkv.weight)


def test_hf_hub_name_from_a_local_cache(custom, tmp_path, monkeypatch):
    """``timm.create_model("hf-hub:...")`` reads our folder as the Hub serves it (offline: a pre-filled cache)."""
    commit = "0" * 40
    repo = tmp_path / "models--someone--biformer-custom"
    save_pretrained(custom, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = timm.create_model("hf-hub:someone/biformer-custom", pretrained=True, cache_dir=str(tmp_path))
    same_outputs(custom, loaded)


def test_model_built_directly_needs_its_arguments(tmp_path):
    arguments = dict(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=3)
    model = perturbed(biformer.BiFormer(**arguments))  # the class's auto_pad default is False
    with pytest.raises(ValueError, match="pass architecture="):
        save_pretrained(model, tmp_path / "a")
    with pytest.raises(ValueError, match="does not rebuild this model.*downsample_layers.0.0.weight"):
        save_pretrained(model, tmp_path / "a", architecture="biformer_tiny", model_args=dict(depth=[1, 1, 1, 1]))
    # same shapes, different behaviour: auto_pad is a hyper-parameter of every BRA layer
    with pytest.raises(ValueError, match="auto_pad=False.*vs rebuilt.*auto_pad=True"):
        save_pretrained(model, tmp_path / "a", architecture="biformer_tiny", model_args=arguments)
    with pytest.raises(ValueError, match="architecture: expected one of"):
        save_pretrained(model, tmp_path / "a", architecture="resnet50")
    assert not (tmp_path / "a").exists()
    folder = save_pretrained(model, tmp_path / "a", architecture="biformer_tiny",
                             model_args=dict(arguments, auto_pad=False))
    loaded = load_pretrained(folder)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)


def test_existing_folder_is_not_overwritten(custom, tmp_path):
    folder = save_pretrained(custom, tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(timm.create_model("biformer_tiny", **CUSTOM), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    save_pretrained(custom, folder, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        save_pretrained(custom, tmp_path / "file")


@pytest.fixture
def saved(custom, tmp_path):
    return save_pretrained(custom, tmp_path / "saved")


def test_load_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    config = saved / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"architecture": "biformer_tiny"', '"architecture": "resnet50"'))
    with pytest.raises(ValueError, match="names architecture 'resnet50'"):
        load_pretrained(saved)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(saved)
    config.write_text(text)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load the weights"):
        load_pretrained(saved)
    weights.unlink()
    with pytest.raises(ValueError, match="cannot load the weights"):
        load_pretrained(saved)


def test_load_model_by_name_and_file(tmp_path):
    arch = {key: value for key, value in CUSTOM.items() if key != "num_classes"}
    source = perturbed(timm.create_model("biformer_tiny", num_classes=5, **arch))
    for suffix in (".pth", ".safetensors"):
        path = biformer.save_weights(source, tmp_path / f"w{suffix}")
        loaded = load_model("biformer_tiny", path, **arch)  # the head size comes from the file
        assert loaded.num_classes == 5 and "state_dict" not in loaded.pretrained_cfg
        same_outputs(source, loaded)
    fresh_head = load_model("biformer_tiny", path, num_classes=7, **arch)
    assert fresh_head.head.out_features == 7
    torch.testing.assert_close(fresh_head.stages[0][0].attn.wo.weight, source.stages[0][0].attn.wo.weight)
    with pytest.raises(ValueError, match="(?s)does not fit biformer_tiny.*Unexpected key.*stages.2.1"):
        load_model("biformer_tiny", path, **dict(arch, depth=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match="model: expected one of"):
        load_model("resnet50")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("biformer_tiny", tmp_path / "missing.pth")


def test_load_model_from_folder(saved, custom):
    same_outputs(custom, load_model(None, saved))
    same_outputs(custom, load_model(str(saved)))
    same_outputs(custom, load_model("biformer_tiny", saved))
    with pytest.raises(ValueError, match="holds a 'biformer_tiny'"):
        load_model("biformer_small", saved)
    with pytest.raises(ValueError, match="already a model folder"):
        load_model(str(saved), saved / "model.safetensors")


def test_torch_hub_entry_points(saved, custom):
    spec = importlib.util.spec_from_file_location("biformer_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = sorted(name for name in dir(hubconf) if callable(getattr(hubconf, name)) and name[0] != "_")
    assert entry_points == sorted(biformer.MODEL_NAMES)
    assert hubconf.dependencies == ["torch", "timm", "safetensors"]

    model = torch.hub.load(str(REPO), "biformer_tiny", source="local", num_classes=3)
    assert isinstance(model, biformer.BiFormer) and model.num_classes == 3
    same_outputs(custom, torch.hub.load(str(REPO), "biformer_tiny", source="local", weights=saved))
    with pytest.raises(ValueError, match="download links for biformer_tiny are broken"):
        torch.hub.load(str(REPO), "biformer_tiny", source="local", pretrained=True)
    with pytest.raises(ValueError, match="holds a 'biformer_tiny'"):
        torch.hub.load(str(REPO), "biformer_stl", source="local", weights=saved)


def test_biformer_nano_is_a_full_member(tmp_path):
    """biformer_nano (no released weights) is in the names list, saves as a Hub folder and has a torch.hub entry."""
    assert "biformer_nano" in biformer.MODEL_NAMES and "biformer_nano" not in biformer.RELEASED_MODEL_NAMES
    model = perturbed(timm.create_model("biformer_nano", num_classes=4, n_win=2, topks=[2, 2, 4, -2]))
    folder = save_pretrained(model, tmp_path / "nano")
    same_outputs(model, load_pretrained(folder))
    same_outputs(model, torch.hub.load(str(REPO), "biformer_nano", source="local", weights=folder))
    with pytest.raises(ValueError, match="pretrained: biformer_nano has no released weights; pass weights=PATH"):
        torch.hub.load(str(REPO), "biformer_nano", source="local", pretrained=True)


def test_pooling_changed_after_construction_is_saved(tmp_path):
    """reset_classifier(n, "catavgmax") doubles the head's input: the folder records the pooling and rebuilds it."""
    model = perturbed(timm.create_model("biformer_nano", num_classes=4, n_win=2, topks=[2, 2, 4, -2]))
    model.reset_classifier(4, "catavgmax")
    folder = save_pretrained(model, tmp_path / "pooled")
    assert json.loads((folder / "config.json").read_text())["model_args"]["global_pool"] == "catavgmax"
    loaded = load_pretrained(folder)
    assert loaded.global_pool.pool_type == "catavgmax" and loaded.head.in_features == 2 * loaded.num_features
    same_outputs(model, loaded)
