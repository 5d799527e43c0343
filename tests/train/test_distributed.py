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
                                                           "metrics.json", "metrics.png", "tensorboard"]
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


KILLED_RANK_0 = """
import json, os, signal, sys
from biformer.train import Trainer, load_config

values, run_dir, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def kill(trainer):
    if trainer.step == kill_at and trainer.dist.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # torchrun then stops the other process too

with Trainer(load_config((values, "test")), run_dir=run_dir) as trainer:
    trainer.step_callbacks.append(kill)
    trainer.fit()
"""


def test_two_processes_killed_inside_an_epoch_resume_bit_identically(tmp_path):
    """torchrun, 2 processes, recovery checkpoints every 2 steps: rank 0 is SIGKILLed at a random step of epoch 2;
    `biformer train --resume` under torchrun continues from the last saved step and ends with the weights of an
    uninterrupted 2-process run."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    data = make_image_folder(tmp_path / "data", per_class=(8, 3))  # 24 training images: 2 x batch 2 -> 6 steps
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), batch_size=2, epochs=2,
                           mixup=0.5, cutmix=0.5, reprob=0.5, drop_path=0.2, model_ema=True, model_ema_decay=0.9,
                           repeated_aug=3, checkpoint_every=2, workers=0, tensorboard=False)  # workers: 1-process test
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    straight = subprocess.run([*launcher, "-m", "biformer", "train", *as_flags(dict(values, name="straight"))],
                              capture_output=True, text=True, timeout=240, env=environment)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())["steps"] == 12

    kill_at = int(np.random.default_rng().integers(8, 12))  # steps 8..11: after the recovery checkpoint of step 8
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RANK_0)
    killed = subprocess.run([*launcher, str(script), json.dumps(values), str(tmp_path / "killed"), str(kill_at)],
                            capture_output=True, text=True, timeout=240, env=environment)
    assert killed.returncode != 0
    saved = sorted(path.name for path in (tmp_path / "killed" / "checkpoints").glob("recovery-*.pt"))
    assert saved[-1] == f"recovery-{kill_at // 2 * 2:09d}.pt", (kill_at, saved, killed.stderr[-2000:])

    resumed = subprocess.run([*launcher, "-m", "biformer", "train", "--resume", str(tmp_path / "killed")],
                             capture_output=True, text=True, timeout=240, env=environment)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming inside epoch 2 after step {kill_at // 2 * 2}" in resumed.stdout
    for name in ("last.safetensors", "last-ema.safetensors"):
        expected = load_file(str(tmp_path / "straight" / "checkpoints" / name))
        actual = load_file(str(tmp_path / "killed" / "checkpoints" / name))
        assert all(torch.equal(expected[key], actual[key]) for key in expected), (name, kill_at)
    rows = [json.loads((tmp_path / run / "metrics.json").read_text())["history"] for run in ("straight", "killed")]
    assert [row["train_loss"] for row in rows[0]] == [row["train_loss"] for row in rows[1]]


def test_eval_under_torchrun_shards_and_gathers_the_one_process_metrics(tmp_path, capsys):
    """`torchrun --nproc_per_node=2 -m biformer eval` on 15 images (8 + 7 per process): the same confusion
    matrix, top-1/top-5 and per-class accuracy as one process, and one report."""
    from biformer.train import Trainer, load_config

    data = make_image_folder(tmp_path / "data", per_class=(4, 5))
    values = micro_options(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run", epochs=4,
                           batch_size=4, tensorboard=False, seed=1, eval_every=4)
    with Trainer(load_config((values, "test"))) as trainer:
        trainer.fit()
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.safetensors")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "biformer",
               "eval", checkpoint, "--output", str(tmp_path / "two"), "--no-progress", "--batch-size", "3"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=240,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stdout.count("top-5") == 1  # one report, from rank 0
    assert main(["eval", checkpoint, "--output", str(tmp_path / "one"), "--no-progress", "--workers", "0"]) == 0
    two, one = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("two", "one"))
    assert two["samples"] == one["samples"] == 15
    assert sum(any(row[column] for row in one["confusion"]) for column in range(3)) >= 2  # not one class for all
    for key in ("confusion", "top1", "top5", "per_class_top1"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)  # float sums in another order and batch split
