"""``biformer compare``: the files it writes hold real measurements; bad options give one line and exit code 2."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
import timm
import torch
import yaml

import biformer  # noqa: F401  (registers the models)
from biformer.cli import main
from biformer.comparison.cost import count_flops
from biformer.train.data import read_idx
from train.synthetic import make_fashion_mnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv_values(path, section: str, attn_type: str, metric: str) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["value"]) for row in csv.DictReader(handle)
                if (row["section"], row["attn_type"], row["metric"]) == (section, attn_type, metric)]


def test_cost_files_hold_real_measurements(tmp_path, capsys):
    output = tmp_path / "cost"
    # 128 px: stage 1 of biformer_nano is 32 x 32 tokens, four times the default 8 x 8 window
    assert main(["compare", "--tasks", "cost", "--model", "biformer_nano", "--sizes", "128",
                 "--attn-types", "bra", "global", "window", "--repeats", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert {path.name for path in output.iterdir()} >= {"results.json", "results.csv", "table.md", "cost.png"}
    assert (output / "cost.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((output / "results.json").read_text())
    points = {point["attn_type"]: point for point in results["cost"]}
    assert set(points) == {"bra", "global", "window"} and results["training_runs"] == []
    for attn_type, point in points.items():
        model = timm.create_model("biformer_nano", attn_type=attn_type)
        assert point["params"] == sum(parameter.numel() for parameter in model.parameters())
        assert point["size"] == 128 and point["skipped"] is None
        assert len(point["seconds_per_call"]) == 2
        assert point["images_per_s"] == pytest.approx(1 / statistics.median(point["seconds_per_call"]))
        assert point["peak_extra_mib"] >= 0
        assert sum(point["flops_by_op"].values()) == pytest.approx(point["gflops"])
        assert _csv_values(output / "results.csv", "cost", attn_type, "gflops") == pytest.approx([point["gflops"]])
    # everything but the attention is the same network: the difference is all in the attention kernel, which
    # torch's counter would miss on CPU without our entry
    assert points["global"]["gflops"] > points["window"]["gflops"]
    attention = "aten._scaled_dot_product_flash_attention_for_cpu"
    others = {op: value for op, value in points["global"]["flops_by_op"].items() if op != attention}
    assert others == pytest.approx({op: value for op, value in points["window"]["flops_by_op"].items()
                                    if op != attention})
    table = (output / "table.md").read_text()
    bra, window = points["bra"], points["window"]
    assert (f"| 128 px | window | {window['params'] / 1e6:.2f} | {window['gflops']:.2f} | "
            f"{window['gflops'] / bra['gflops']:.2f}x | {window['images_per_s']:.2f} | "
            f"{window['images_per_s'] / bra['images_per_s']:.2f}x | {window['peak_extra_mib']:.0f} |") in table
    assert f"| 128 px | bra | {bra['params'] / 1e6:.2f} | {bra['gflops']:.2f} | 1.00x |" in table
    assert table in printed and "results: " in printed


def test_cost_model_kwargs_reach_every_cost_model(tmp_path, capsys):
    """BRA with fixed-size regions (8 x 8 stage-1 tokens at 128 px instead of n_win=7's 5 x 5 on a map padded
    to 35 x 35) is another network; window attention, which has no regions, is the same either way."""
    common = ["compare", "--tasks", "cost", "--model", "biformer_nano", "--sizes", "128", "--attn-types", "bra",
              "window", "--repeats", "1"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--cost-model-kwargs", "{region_sizes: [8, 4, 2, null]}",
                 "--output", str(tmp_path / "regions")]) == 0
    plain, regions = ({point["attn_type"]: point for point in json.loads((tmp_path / name / "results.json")
                       .read_text())["cost"]} for name in ("plain", "regions"))
    model = timm.create_model("biformer_nano", attn_type="bra", region_sizes=[8, 4, 2, None])
    assert regions["bra"]["gflops"] == pytest.approx(count_flops(model.eval(), torch.rand(1, 3, 128, 128))[0] / 1e9)
    assert regions["bra"]["gflops"] != pytest.approx(plain["bra"]["gflops"])
    assert regions["window"]["gflops"] == pytest.approx(plain["window"]["gflops"])
    assert "{'region_sizes': [8, 4, 2, None]}, inference" in (tmp_path / "regions" / "table.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "cost", "--model-kwargs", "{n_win: 4}"], "--model-kwargs: sets the classification model only"),
    (["--tasks", "classification", "--cost-model-kwargs", "{n_win: 4}"], "--cost-model-kwargs: sets the cost models"),
])
def test_model_arguments_for_a_task_that_does_not_run_are_refused(tmp_path, capsys, arguments, message):
    assert main(["compare", *arguments, "--output", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_training_runs_are_the_engine_runs(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "fm", train=48, test=24)
    output = tmp_path / "accuracy"
    assert main(["compare", "--tasks", "classification,segmentation", "--attn-types", "bra", "window",
                 "--seeds", "0", "1", "--epochs", "1", "--train-samples", "32", "--train-batch-size", "4",
                 "--train-scenes", "8", "--val-scenes", "4", "--scene-size", "64", "--data-dir", str(data),
                 "--model-kwargs", "{n_win: 1, topks: [1, 1, 1, -2]}", "--output", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    runs = results["training_runs"]
    assert [(run["task"], run["attn_type"], run["seed"]) for run in runs] == [
        (task, attn_type, seed) for task in ("classification", "segmentation") for seed in (0, 1)
        for attn_type in ("bra", "window")]
    for run in runs:
        engine = json.loads((output / "runs" / f"{run['task']}-{run['attn_type']}-seed{run['seed']}"
                             / "metrics.json").read_text())
        assert run["value"] == engine["final"][engine["main_metric"]]  # the engine's own final evaluation
        assert run["steps"] == engine["steps"] == (8 if run["task"] == "classification" else 2)  # 32/4, 8/4
        assert run["epochs"] == 1
        config = yaml.safe_load((output / "runs" / f"{run['task']}-{run['attn_type']}-seed{run['seed']}"
                                 / "config.yaml").read_text())
        assert config["model_kwargs"]["attn_type"] == run["attn_type"] and config["seed"] == run["seed"]
        if run["task"] == "classification":
            assert config["model_kwargs"]["topks"] == [1, 1, 1, -2] and config["input_size"] == 32
    # the training subset is the first 32 images of the given Fashion-MNIST
    subset = read_idx(output / "data" / "fashion-mnist" / "train-images-idx3-ubyte")
    assert np.array_equal(subset, read_idx(data / "train-images-idx3-ubyte.gz")[:32])
    summary = {(row["task"], row["attn_type"]): row for row in results["accuracy_summary"]}
    table = (output / "table.md").read_text()
    for (task, attn_type), row in summary.items():
        values = [run["value"] for run in runs if (run["task"], run["attn_type"]) == (task, attn_type)]
        assert row["values"] == values
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        digits = 2 if task == "classification" else 4
        cell = f"| {attn_type} | {row['params'] / 1e6:.2f} | {np.mean(values):.{digits}f} ± "
        assert cell + f"{np.std(values, ddof=1):.{digits}f} (2) |" in table
    assert (output / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert not (output / "cost.png").exists()  # cost was not asked for


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--attn-types", "bra", "sparse"], "--attn-types: unknown ['sparse']; expected some of bra, global"),
        (["--tasks", "cost,speed"], "--tasks: unknown ['speed']"),
        (["--sizes", "224", "16"], "--sizes: expected image sides in pixels >= 32, got 16"),
        (["--sizes", "0"], "--sizes: expected image sides in pixels >= 32, got 0"),
        (["--budget-minutes", "0"], "--budget-minutes: expected a positive number, got 0"),
        (["--budget-minutes", "-2"], "--budget-minutes: expected a positive number, got -2"),
        (["--seeds", "1", "1"], "--seeds: expected each value once, got [1, 1]"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
        (["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(tmp_path, capsys, arguments, message):
    assert main(["compare", *arguments, "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("biformer compare: error: ") and message in error
    assert error.count("\n") == 1
    assert not (tmp_path / "run" / "results.json").exists()


def test_output_that_cannot_be_written_or_holds_results(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["compare", "--tasks", "cost", "--output", str(blocker / "run")]) == 2
    assert f"--output: cannot write to {blocker / 'run'}" in capsys.readouterr().err
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    assert main(["compare", "--tasks", "cost", "--output", str(earlier)]) == 2
    assert f"--output: {earlier} already holds a comparison (results.json)" in capsys.readouterr().err
    assert (earlier / "results.json").read_text() == "{}"  # never overwritten


def test_a_type_that_cannot_train_is_named_before_anything_runs(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "fm", train=16, test=8)
    output = tmp_path / "run"
    # 32-channel heads leave stage 1 of biformer_nano (32 channels) one head; axial attention needs two
    assert main(["compare", "--tasks", "cost,classification", "--attn-types", "bra", "axial", "--data-dir", str(data),
                 "--train-samples", "16", "--model-kwargs", "{head_dim: 32}", "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("biformer compare: error: --attn-types: 'axial' cannot be trained for classification: ")
    assert "expected an even number, got 1" in error
    assert not (output / "results.json").exists() and not (output / "runs").exists()  # nothing was measured


def test_model_kwargs_must_be_a_mapping(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--model-kwargs", "[1, 2]"])
    assert exit_info.value.code == 2
    assert "--model-kwargs: expected a YAML mapping such as '{n_win: 2}', got '[1, 2]'" in capsys.readouterr().err


def test_help_lists_compare(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--attn-types", "--sizes", "--model", "--budget-minutes", "--seeds", "--tasks", "--output",
                 "--threads"):
        assert flag in text
