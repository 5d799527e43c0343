"""``torchrun --nproc_per_node=2 -m biformer train`` on CPU (gloo): sharded data, reduced metrics, rank 0 writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from biformer.cli import main
from train.synthetic import as_flags, corrupt, make_image_folder, micro_options


def test_two_processes_train_evaluate_and_write_once(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(8, 5))  # 15 validation images: uneven shards 8 + 7
    corrupt(data / "train" / "green" / "2.png")  # found by one process, counted once for the run
    corrupt(data / "val" / "blue" / "4.png")
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path / "runs"), name="ddp",
                           batch_size=4, epochs=2, progress=True, max_bad_images=0.1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "biformer", "train", *as_flags(values)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stdout.count("run folder:") == 2  # the first line and the final summary, from rank 0 only
    assert process.stdout.count("epoch 2/2: train loss") == 1
    assert "2 process(es)" in process.stdout and "global batch 8" in process.stdout

    run = tmp_path / "runs" / "ddp"
    assert sorted(path.name for path in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv",
                                                           "metrics.json", "metrics.png"]
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == [
        "best.safetensors", "last.safetensors", "training-state.pt"]
    document = json.loads((run / "metrics.json").read_text())
    # 24 training images, 2 ranks x batch 4: 3 steps per epoch; every validation image counted once
    assert document["steps"] == 6
    final = document["final"]
    assert final["samples"] == 15 and sum(map(sum, final["confusion"])) == 15  # the bad one replaced, not dropped
    assert document["unreadable_images"] == {"train": [str(data / "train" / "green" / "2.png")],
                                             "eval": [str(data / "val" / "blue" / "4.png")]}
    with open(run / "metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    assert (last["unreadable_train_images"], last["unreadable_eval_images"]) == ("1", "1")

    # the reduced metrics equal a single-process evaluation of the saved weights
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoints" / "last.safetensors"), "--output", str(tmp_path / "eval"),
                 "--no-progress", "--workers", "0"]) == 0
    single = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert single["unreadable_images"] == [str(data / "val" / "blue" / "4.png")]  # eval skips it the same way
    assert single["confusion"] == final["confusion"]
    assert single["top1"] == pytest.approx(final["top1"]) and single["loss"] == pytest.approx(final["loss"], rel=1e-5)
