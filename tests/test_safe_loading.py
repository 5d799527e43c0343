"""Checkpoints and Hub folders are data: what their descriptions may make the program do (docs/safe-loading.md).

Checkpoints are written here directly (the training loop writes the same files), so no test trains.
"""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import timm
import torch
from safetensors.torch import save_file

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoint import read_state_dict
from biformer.cli import main
from biformer.hub import load_model, load_pretrained, model_from_checkpoint, save_pretrained
from biformer.model_files import architecture_arguments
from biformer.train.checkpoints import save_weights_with_metadata
from biformer.train.classification import ClassificationTask
from biformer.train.config import load_config
from biformer.train.inference import load_for_inference

MICRO = {"depth": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "qk_dims": [8, 16, 16, 16], "head_dim": 8}


def write_checkpoint(path, model="biformer_nano", model_kwargs=None, in_chans=1, classes=3, input_size=32,
                     description=None):
    """A training checkpoint as the training loop writes it: weights + the run's description."""
    values = dict(model=model, model_kwargs=dict(MICRO, **(model_kwargs or {})), in_chans=in_chans,
                  input_size=input_size, dataset="imagefolder", data_dir=str(path.parent))
    config = load_config((values, "test"))
    info = dict(class_names=[f"c{i}" for i in range(classes)], in_chans=in_chans, input_size=input_size,
                mean=[0.5] * in_chans, std=[0.25] * in_chans, interpolation="bilinear", crop_pct=1.0)
    network = ClassificationTask(config).build_model(info).eval()
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    description = description if description is not None else dict(config=config.to_dict(), data=info, epoch=1)
    save_weights_with_metadata(network, path, description)
    return network


def rewrite_description(path, change):
    """Load a checkpoint's tensors and description, let ``change`` edit the description, write it back."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        description = json.loads(handle.metadata()["biformer"])
    description = change(description)
    save_file(tensors, str(path), metadata={"biformer": json.dumps(description)})


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download from the Hugging Face Hub fails the test."""
    import timm.models._builder as builder
    import timm.models._hub as hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for module, name in ((hub, "download_from_hf"), (hub, "load_state_dict_from_hf"),
                         (builder, "load_state_dict_from_hf"), (builder, "load_state_dict_from_url")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


# --- item 1: metadata never reaches the network or other files --------------------------------------------
@pytest.mark.parametrize("injected", [
    {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": "some/repo"}},
    {"file": "/etc/passwd"},
    {"checkpoint_path": "other.pth"},
])
def test_checkpoint_metadata_cannot_reach_network_or_files(tmp_path, injected, no_network, capsys):
    path = tmp_path / "last.safetensors"
    write_checkpoint(path)
    rewrite_description(path, lambda d: {**d, "config": {**d["config"], "model_kwargs": {
        **d["config"]["model_kwargs"], **injected}}})
    with pytest.raises(ValueError, match="are not architecture arguments"):
        load_for_inference(path)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "are not architecture arguments" in err and sorted(injected)[0] in err


def test_allow_list_is_the_architecture(tmp_path):
    allowed = architecture_arguments("biformer_tiny")
    assert {"depth", "embed_dim", "n_win", "topks", "num_classes", "in_chans"} <= allowed
    assert not {name for name in allowed if name.startswith("pretrained")}
    assert "checkpoint_path" not in allowed and "file" not in allowed
    assert architecture_arguments("resnet18") == frozenset()


def hub_folder(tmp_path, **model_args_changes):
    model = timm.create_model("biformer_tiny", num_classes=3, **MICRO).eval()
    folder = save_pretrained(model, tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(model_args_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hub_config_cannot_reach_network(tmp_path, no_network):
    folder = hub_folder(tmp_path, pretrained_cfg_overlay={"hf_hub_id": "some/repo"}, pretrained=True)
    with pytest.raises(ValueError, match="are not architecture arguments"):
        load_pretrained(folder)


def test_hub_config_asking_a_larger_network_is_refused_before_building(tmp_path, monkeypatch):
    folder = hub_folder(tmp_path, depth=[1, 1, 30, 1], embed_dim=[8, 16, 512, 512], qk_dims=[8, 16, 512, 512])
    built = []
    original = timm.create_model

    def spy(*args, **kwargs):
        if torch.get_default_device().type != "meta":  # a real network, not the shape check's
            built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    with pytest.raises(ValueError, match="do not fit the network the description asks for"):
        load_pretrained(folder)
    assert not built  # refused from the shapes, before any real network was built


def test_a_described_network_over_the_bound_is_refused(tmp_path):
    folder = hub_folder(tmp_path, depth=[100, 100, 100, 100], embed_dim=[2048, 4096, 4096, 4096],
                        qk_dims=[2048, 4096, 4096, 4096], head_dim=64)
    with pytest.raises(ValueError, match="over the bound"):
        load_pretrained(folder)


# --- item 2: one function rebuilds the exact model, for every command -----------------------------------
def test_export_and_show_routing_rebuild_the_trained_model(tmp_path):
    path = tmp_path / "best.safetensors"
    trained = write_checkpoint(path, model="biformer_tiny", model_kwargs={"n_win": 2, "topks": [2, 2, 4, -2]},
                               in_chans=3, input_size=32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
        for model in (load_for_inference(path).model, model_from_checkpoint(path), load_model(None, path),
                      load_model("biformer_tiny", path)):
            assert model.stages[0][0].attn.n_win == 2 and model.stages[0][0].attn.topk == 2
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert model_from_checkpoint(path).pretrained_cfg["input_size"] == (3, 32, 32)  # exports at 32 px


def test_a_biformer_nano_training_checkpoint_loads_everywhere(tmp_path, capsys):
    path = tmp_path / "last.safetensors"
    trained = write_checkpoint(path, model_kwargs={"n_win": 2, "topks": [2, 2, 4, -2]}, in_chans=1)
    model = load_model(None, path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), atol=0, rtol=0)
    out = tmp_path / "nano.pt"
    assert main(["export", "--checkpoint", str(path), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "32x32" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a biformer_nano"):
        load_model("biformer_tiny", path)


# --- the metadata itself --------------------------------------------------------------------------------
@pytest.mark.parametrize("description, message", [
    ([1, 2, 3], "expected a mapping with 'config' and 'data', got list"),
    ({}, "expected mappings under 'config' and 'data'"),
    ("hello", "got str"),
    ("input_size", "'data.input_size' must be an integer in"),
])
def test_malformed_metadata_gives_one_line(tmp_path, capsys, description, message):
    path = tmp_path / "last.safetensors"
    write_checkpoint(path)
    if description == "input_size":
        rewrite_description(path, lambda d: {**d, "data": {**d["data"], "input_size": -5}})
    else:
        rewrite_description(path, lambda d: description)
    with pytest.raises(ValueError, match=message):
        load_for_inference(path)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.split(",")[0] in err


# --- weight files ---------------------------------------------------------------------------------------
def test_integer_keys_are_refused_in_one_line(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({0: torch.zeros(1), "a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="keys must be strings"):
        read_state_dict(path)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_refusal_is_one_line_without_torchs_advice(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(ValueError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "\n" not in message and "weights_only=False" not in message and "refused" in message


def test_file_format_is_read_from_the_content_not_the_name(tmp_path):
    tensors = {"a": torch.arange(4.0)}
    misnamed = tmp_path / "really-safetensors.pth"
    save_file(tensors, str(misnamed))
    torch.testing.assert_close(read_state_dict(misnamed)["a"], tensors["a"])
    pickled = tmp_path / "really-torch.safetensors"
    torch.save({"model": tensors}, pickled)
    torch.testing.assert_close(read_state_dict(pickled)["a"], tensors["a"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10**15) + b"x" * 20)
    with pytest.raises(ValueError, match="cannot read"):
        read_state_dict(garbage)


def test_a_folder_given_as_checkpoint_says_so(tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err


def test_a_truncated_pretrained_file_is_named(tmp_path):
    model = timm.create_model("biformer_tiny", num_classes=2, **MICRO)
    full = tmp_path / "full.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(full))
    for name, data in (("half.safetensors", full.read_bytes()[: full.stat().st_size // 2]),
                       ("half.pth", b"PK\x03\x04" + b"\x00" * 40)):
        truncated = tmp_path / name
        truncated.write_bytes(data)
        with pytest.raises(ValueError, match=f"pretrained weights {truncated}: cannot read them"):
            timm.create_model("biformer_tiny", num_classes=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(truncated)), **MICRO)
