"""Safe weight loading: formats, prefixes, and clear errors for bad files."""

from __future__ import annotations

import errno
import pickle

import pytest
import timm
import torch

import biformer
from biformer import files


@pytest.fixture(scope="module")
def model():
    return timm.create_model("biformer_tiny", num_classes=4)


def test_round_trip_both_formats(model, tmp_path):
    for name in ("w.pth", "w.safetensors"):
        path = biformer.save_weights(model, tmp_path / name)
        other = timm.create_model("biformer_tiny", num_classes=4)
        biformer.load_checkpoint(other, path)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(other.state_dict()[key], value)
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_file(model, tmp_path):
    with pytest.raises(FileNotFoundError):
        biformer.load_checkpoint(model, tmp_path / "nope.pth")


def test_truncated_and_corrupted_files(model, tmp_path):
    path = biformer.save_weights(model, tmp_path / "w.pth")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read"):
        biformer.load_checkpoint(model, path)
    corrupted = tmp_path / "c.safetensors"
    corrupted.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        biformer.load_checkpoint(model, corrupted)


class Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_arbitrary_pickles_are_refused(model, tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": Exploit()}, f)
    with pytest.raises(ValueError, match="cannot read"):
        biformer.load_checkpoint(model, path)


def test_other_architecture_lists_keys(model, tmp_path):
    path = biformer.save_weights(timm.create_model("biformer_stl", num_classes=4), tmp_path / "stl.pth")
    with pytest.raises(ValueError, match="shapes differ|missing keys"):
        biformer.load_checkpoint(model, path)


def test_missing_and_unexpected_keys(model, tmp_path):
    state = dict(model.state_dict())
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="head.weight.*extra.weight"):
        biformer.load_checkpoint(model, tmp_path / "partial.pth")
    result = biformer.load_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert result.missing_keys == ["head.weight"] and result.unexpected_keys == ["extra.weight"]


def test_not_a_state_dict(tmp_path, model):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        biformer.load_checkpoint(model, tmp_path / "list.pth")


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, name):
    """A write that fails (here: disk full while flushing) raises WriteError naming the file, keeps the previous
    version byte for byte and leaves no temporary file behind."""
    model = timm.create_model("biformer_nano", num_classes=3)
    path = biformer.save_weights(model, tmp_path / name)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def disk_full(temporary):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_sync_to_disk", disk_full)
    with pytest.raises(files.WriteError, match=rf"cannot write .*{name} \(No space left on device\); its previous"):
        biformer.save_weights(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
