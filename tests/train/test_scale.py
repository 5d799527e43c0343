"""Training at scale on CPU: the fp16 gradient scaler's logic, live logs (TensorBoard, W&B offline), the epoch
sampler with repeated augmentation, and the options' bad-input messages."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from biformer.cli import main
from biformer.train import ConfigError, Trainer, load_config
from biformer.train.classification import ClassificationTask
from biformer.train.precision import MAX_SKIPPED_IN_A_ROW, StepGuard
from biformer.train.recovery import EpochSampler, prune_recovery_files, recovery_files, recovery_path
from train.synthetic import as_flags, make_image_folder, micro_options


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("scale-data"))


def options(tmp_path, data, **overrides):
    return micro_options(**{**dict(dataset="imagefolder", data_dir=str(data), output=str(tmp_path), name="run",
                                   input_size=32), **overrides})


# --- precision -------------------------------------------------------------------------------------------
def test_scaled_step_on_finite_gradients_equals_the_plain_step():
    """Scaling by a power of two and unscaling is exact: the fp16 path's update equals the plain fp32 update."""
    torch.manual_seed(0)
    reference, scaled = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    scaled.load_state_dict(reference.state_dict())
    inputs = torch.randn(4, 5)
    plain_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1)
    reference(inputs).square().mean().backward()
    plain_optimizer.step()
    guard, optimizer = StepGuard("fp16", torch.device("cpu")), torch.optim.AdamW(scaled.parameters(), lr=0.1)
    guard.backward(scaled(inputs).square().mean())
    assert scaled.weight.grad.abs().max() > 1000  # the gradients were multiplied by the scale (65536)
    guard.unscale(optimizer)
    assert guard.step(optimizer) and guard.skipped == 0
    for expected, actual in zip(reference.parameters(), scaled.parameters()):
        assert torch.equal(expected, actual)


def test_non_finite_gradients_skip_the_step_halve_the_scale_and_stop_a_diverged_run():
    model = torch.nn.Linear(3, 1)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    guard, optimizer = StepGuard("fp16", torch.device("cpu")), torch.optim.SGD(model.parameters(), lr=1.0)
    scale = guard.scale
    guard.backward(model(torch.ones(1, 3)).sum() * float("inf"))
    assert guard.step(optimizer) is False
    assert (guard.skipped, guard.scale) == (1, scale / 2)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))  # untouched
    state = guard.state_dict()
    restored = StepGuard("fp16", torch.device("cpu"))
    restored.load_state_dict(state)
    assert (restored.skipped, restored.scale) == (1, scale / 2)
    with pytest.raises(FloatingPointError, match=r"precision fp16: 30 optimizer steps in a row had inf/NaN"):
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            optimizer.zero_grad()
            guard.backward(model(torch.ones(1, 3)).sum() * float("nan"))
            guard.step(optimizer)


def test_fp16_training_skips_a_non_finite_step_and_writes_the_count(tmp_path, folder_data, monkeypatch):
    original, calls = ClassificationTask.training_loss, []

    def poisoned(self, model, batch):
        calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        loss, count = original(self, model, batch)
        return (loss * float("inf") if len(calls) == 2 else loss), count

    monkeypatch.setattr(ClassificationTask, "training_loss", poisoned)
    snapshots = []
    config = load_config((options(tmp_path, folder_data, precision="fp16", epochs=1), "test"))
    with Trainer(config) as trainer:
        trainer.step_callbacks.append(
            lambda t: snapshots.append([p.detach().clone() for p in t.model.parameters()]))
        trainer.fit()
    assert set(calls) == {torch.float16}
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 skipped: weights kept
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    row = trainer.history[-1]
    assert row["skipped_steps"] == trainer.guard.skipped >= 1
    assert row["loss_scale"] == trainer.guard.scale <= 32768.0
    assert torch.isfinite(torch.tensor(row["train_loss"]))  # the skipped batch's loss is not averaged in


# --- live logs ------------------------------------------------------------------------------------------------
def test_tensorboard_events_hold_loss_lr_throughput_and_every_metric(tmp_path, folder_data, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config((options(tmp_path, folder_data, epochs=2, log_every=1, model_ema=True), "test"))
    with Trainer(config) as trainer:
        trainer.fit()
    out = capsys.readouterr().out
    assert f"live logs: tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in out
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/images_per_s", "epoch/train_loss", "epoch/train_images_per_s"):
        assert tag in tags, tags
    metrics = trainer.history[-1]
    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
        assert f"eval/{key}" in tags
        assert events.Scalars(f"eval/{key}")[-1].value == pytest.approx(metrics[key], rel=1e-6)
    assert [event.step for event in events.Scalars("train/lr")] == list(range(1, trainer.step + 1))
    lrs = [event.value for event in events.Scalars("train/lr")]
    assert lrs[-1] == pytest.approx(metrics["lr"], rel=1e-6)


def test_without_tensorboard_the_run_goes_on_and_names_the_extra(tmp_path, folder_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    config = load_config((options(tmp_path, folder_data, epochs=1), "test"))
    with Trainer(config) as trainer:
        trainer.fit()
    assert "TensorBoard logs off: the tensorboard package is not installed (pip install 'biformer[tensorboard]')" \
        in capsys.readouterr().out
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_missing_is_one_line_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(tmp_path / "absent"), output=str(tmp_path)))
    assert main(["train", *flags, "--wandb"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("biformer train: error: option 'wandb': the wandb package is not installed "
                     "(pip install 'biformer[wandb]'), or drop --wandb")


def test_wandb_runs_offline_in_the_run_folder(tmp_path, folder_data, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = load_config((options(tmp_path, folder_data, epochs=1, wandb=True, tensorboard=False, log_every=1), "t"))
    with Trainer(config) as trainer:
        trainer.fit()
    (init_kwargs,) = calls["init"]
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == str(tmp_path / "run")
    assert init_kwargs["config"]["model"] == "biformer_nano"
    logged = {key for _, values in calls["log"] for key in values}
    assert {"train/loss", "train/lr", "eval/top1", "eval/loss"} <= logged and calls["finish"] == 1


# --- sampler and recovery files -------------------------------------------------------------------------------
def test_epoch_sampler_shares_repeats_and_resumes_at_a_position():
    size = 10
    shares = [EpochSampler(size, rank, 2, seed=3).share() for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(size))  # each index once per epoch
    repeated = [EpochSampler(size, rank, 3, seed=3, repeats=3) for rank in range(3)]
    for sampler in repeated:
        sampler.set_epoch(1)
    indices = [sampler.share() for sampler in repeated]
    assert all(len(share) == size // 3 for share in indices)
    # the r-th copy of an index goes to process r: the first items of each share are the same images
    assert indices[0][0] == indices[1][0] == indices[2][0]
    sampler = EpochSampler(size, 0, 1, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == size - 4
    assert full[4][1] == (3, 2, 0, 4)  # (seed, epoch, rank, position): the image's augmentation seed


def test_only_the_newest_recovery_checkpoints_are_kept(tmp_path):
    for step in (2, 4, 6):
        recovery_path(tmp_path, step).write_bytes(b"x")
    prune_recovery_files(tmp_path, keep=2)
    assert [step for step, _ in recovery_files(tmp_path)] == [4, 6]
    prune_recovery_files(tmp_path, keep=2, up_to_step=5)
    assert [step for step, _ in recovery_files(tmp_path)] == [6]


@pytest.mark.parametrize(("values", "message"), [
    ({"checkpoint_every": 0}, "option 'checkpoint_every': expected None or an integer >= 1, got 0"),
    ({"checkpoint_minutes": -1.0}, "option 'checkpoint_minutes': expected None or a positive number of minutes"),
    ({"keep_checkpoints": 0}, "option 'keep_checkpoints': expected an integer >= 1, got 0"),
    ({"repeated_aug": 0}, "option 'repeated_aug': expected an integer >= 1, got 0"),
    ({"prefetch_factor": 4, "workers": 0}, "option 'prefetch_factor': needs workers >= 1"),
    ({"decay_milestones": [5, 2]}, "option 'decay_milestones': expected None or increasing epochs >= 1"),
    ({"log_every": 0}, "option 'log_every': expected an integer >= 1, got 0"),
])
def test_scale_options_out_of_range_are_named(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config((values, "test"))


def test_sync_bn_on_cpu_is_refused_before_the_data_is_read(tmp_path, capsys):
    flags = as_flags(micro_options(dataset="imagefolder", data_dir=str(tmp_path / "absent"), output=str(tmp_path)))
    assert main(["train", *flags, "--sync-bn", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "biformer train: error: option 'sync_bn': SyncBatchNorm needs CUDA devices (torch has no CPU "
        "implementation), got device cpu; drop --sync-bn")


def test_sync_bn_conversion_replaces_every_batchnorm():
    from biformer.train.distributed import convert_sync_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(
        torch.nn.BatchNorm2d(4)))
    converted, count = convert_sync_batchnorm(model)
    assert count == 2 and not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())


class Stop(Exception):
    pass


def test_resume_passes_over_a_broken_recovery_checkpoint_and_refuses_another_process_count(tmp_path, folder_data,
                                                                                           capsys):
    from biformer.train.checkpoints import load_training_state, save_training_state

    values = options(tmp_path, folder_data, epochs=1, batch_size=4, checkpoint_every=1, keep_checkpoints=2,
                     tensorboard=False)

    def stop(trainer):
        if trainer.step == 3:
            raise Stop

    config = load_config((values, "test"))
    with Trainer(config) as trainer:
        trainer.step_callbacks.append(stop)
        with pytest.raises(Stop):
            trainer.fit()
    folder = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in recovery_files(folder)] == [2, 3]
    recovery_path(folder, 3).write_bytes(b"half a file")  # e.g. a disk that lost the file's last blocks
    with Trainer(config, resume=True, run_dir=tmp_path / "run") as resumed:
        assert (resumed.step, resumed.micro_done) == (2, 2)
    assert "note: passing over an unreadable recovery checkpoint: resume: cannot read" in capsys.readouterr().out

    state = load_training_state(recovery_path(folder, 2))
    state["inside_epoch"]["world_size"] = 2
    save_training_state(recovery_path(folder, 2), state)
    expected = r"resume: .*recovery-000000002.pt was saved inside epoch 1 by 2 process\(es\); resume it with as many"
    with pytest.raises(ValueError, match=expected + r" \(got 1\)"):
        Trainer(config, resume=True, run_dir=tmp_path / "run")


def test_the_number_of_workers_changes_nothing(tmp_path, folder_data):
    """Each image's augmentation is seeded by its place in the epoch, not by the worker that loads it: 0 and 2
    data-loading workers train bit-identical weights (RandAugment, erasing, mixup, drop path on)."""
    finals = []
    for workers in (0, 2):
        values = options(tmp_path, folder_data, epochs=1, batch_size=4, workers=workers, name=f"w{workers}",
                         auto_augment="rand-m9-mstd0.5-inc1-mmax9", reprob=0.5, mixup=0.5, drop_path=0.2,
                         tensorboard=False)
        with Trainer(load_config((values, "test"))) as trainer:
            trainer.fit()
        finals.append({key: value.clone() for key, value in trainer.model.state_dict().items()})
    assert all(torch.equal(finals[0][key], finals[1][key]) for key in finals[0])
