"""One clear line where a traceback or a late failure was: export, show-routing, compare, the BRA layer."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from biformer.cli import main
from biformer.layers import BiLevelRoutingAttention


def run(arguments, capsys):
    try:
        code = main(arguments)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    return code, err.splitlines()[-1] if err else ""


@pytest.fixture
def no_export(monkeypatch):
    """A tiny model instead of the default one; the export itself must never start."""
    import biformer.cli.export

    def refuse(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(biformer.cli.export, "load_model", lambda *args: torch.nn.Identity())
    monkeypatch.setattr(biformer.cli.export, "export_model", refuse)


def test_export_to_a_folder_is_refused_before_the_export(tmp_path, capsys, no_export):
    code, line = run(["export", "-o", str(tmp_path) + "/"], capsys)
    assert code == 1 and "--output:" in line and "is a folder" in line


def test_export_into_a_read_only_folder_is_refused_before_the_export(tmp_path, capsys, no_export, monkeypatch):
    real_access = os.access  # as root every folder is writable: pretend this one is not
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path) and real_access(path, mode))
    code, line = run(["export", "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 1 and "is not writable" in line


def test_export_example_batch_is_bounded(tmp_path, capsys, no_export):
    code, line = run(["export", "-o", str(tmp_path / "m.onnx"), "--batch-size", "5000"], capsys)
    assert code == 2 and "--batch-size: expected an example batch of at most 64" in line


def test_show_routing_dpi_is_bounded(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    code, line = run(["show-routing", str(image), "--point", "1,1", "--dpi", "100000"], capsys)
    assert code == 2 and "--dpi: expected at most 1200 dots per inch" in line


@pytest.mark.parametrize("arguments, message", [
    (["--model", "nope"], "--model: unknown timm model 'nope'"),
    (["--cost-model-kwargs", "{foo: 1}"], "--cost-model-kwargs: ['foo'] are not architecture arguments"),
])
def test_compare_models_are_checked_before_running(tmp_path, capsys, arguments, message):
    code, line = run(["compare", "--tasks", "cost", "--output", str(tmp_path / "c"), *arguments], capsys)
    assert code == 2 and message in line


@pytest.mark.parametrize("options, message", [
    (dict(qk_scale="a"), "qk_scale: expected None or a positive finite number, got 'a'"),
    (dict(qk_scale=float("inf")), "qk_scale: expected None or a positive finite number, got inf"),
    (dict(qk_dim=0), "qk_dim: expected an integer >= 1, got 0"),
])
def test_bra_layer_options(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1, **options)
    assert BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1)(torch.randn(1, 4, 4, 16)).shape == (1, 4, 4, 16)
