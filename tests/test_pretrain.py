"""The pretraining task end to end on generated images: outputs, resume, non-finite guard, input errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_images
from simclr_cli.engine import checkpoint, defaults, rundir
from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.methods import simclr as simclr_method
from simclr_cli.engine.model import build_model
from simclr_cli.engine.tasks import pretrain as task
from simclr_cli.engine.errors import ConfigError, DataError, NonFiniteLoss, Stopped
from simclr_cli.engine.report import NoProgress, StepStats


def tiny_config(folder: Path, **train) -> PretrainConfig:
    """resnet18 at width 0.25 on 16 px views: a few steps take seconds on a CPU."""
    cfg = PretrainConfig()
    cfg.data.source = str(folder)
    cfg.data.workers = 0
    cfg.model.arch, cfg.model.width = "resnet18", 0.25
    cfg.augment.image_size = 16
    cfg.train.batch_size = 8
    cfg.train.epochs = 2
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.train.log_every = 1
    cfg.optim.warmup_epochs = 0.5
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


class CrashAt(NoProgress):
    """A progress display that kills the run when it is told about `step` (a crash after that step)."""

    def __init__(self, step: int):
        self.step = step

    def update(self, stats: StepStats) -> None:
        if stats.step == self.step:
            raise KeyboardInterrupt


def encoder_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "encoder.safetensors"))


def test_run_writes_config_metrics_checkpoints_and_encoder(image_folder, tmp_path):
    out = tmp_path / "run"
    result = task.run(tiny_config(image_folder), out=out)
    # 24 images, batch 8 -> 3 steps per epoch, 2 epochs
    assert result.steps == 6 and result.epochs_done == 2.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["stem"] == "small" and saved["augment"]["blur_p"] == 0.0  # auto values resolved
    assert saved["train"]["temperature"] == 0.5  # the small-image recipe, written out: tau 0.5 and momentum SGD
    assert {k: saved["optim"][k] for k in ("name", "lr", "weight_decay", "warmup_epochs")} == {
        "name": "sgd", "lr": 0.3, "weight_decay": 5e-4, "warmup_epochs": 0.5}  # the warm-up tiny_config gives
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "lr", "time"} <= set(lines[0])
    assert [r["epoch"] for r in lines] == [1, 1, 1, 2, 2, 2]  # counted from 1: the epoch each step belongs to
    assert all(r["loss"] > 0 for r in lines)
    assert lines[-1]["lr"] < lines[1]["lr"]  # cosine decay towards 0
    # a run of seconds saves its training state once, at the end (the default cadence is every 10 minutes)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000006.safetensors"]
    assert saved["train"]["checkpoint_minutes"] == 10.0 and saved["train"]["checkpoint_every"] is None
    model, info = checkpoint.load_encoder(out / "encoder.safetensors")
    assert info.step == 6 and info.epoch == 2 and info.image_size == 16 and info.model.stem == "small"
    assert info.config == saved
    h, z = model.eval()(torch.zeros(2, 3, 16, 16))
    assert h.shape == (2, 128) and z.shape == (2, 128)


def test_resume_after_a_crash_mid_epoch_is_bit_identical(image_folder, tmp_path):
    uninterrupted = tmp_path / "a"
    task.run(tiny_config(image_folder, checkpoint_every=2), out=uninterrupted)

    crashed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, progress=CrashAt(5))
    # the newest checkpoint is step 4, in the middle of epoch 1 (3 steps per epoch)
    assert (crashed / "checkpoints" / "step-000000004.safetensors").exists()
    result = task.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, resume=True)
    assert result.resumed_from == 4 and result.steps == 6

    a, b = encoder_weights(uninterrupted), encoder_weights(crashed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics logged after the checkpoint were dropped and logged again, once
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses_a = [json.loads(line)["loss"] for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    losses_b = [json.loads(line)["loss"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert losses_a == losses_b


def test_resume_may_change_the_checkpoint_cadence_and_stays_bit_identical(image_folder, tmp_path):
    """How often a run saves is not part of what it computes: a run saved every 2 steps resumes under the default
    cadence (by the clock) to the same weights as a run that never stopped."""
    uninterrupted = tmp_path / "a"
    task.run(tiny_config(image_folder), out=uninterrupted)
    crashed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, progress=CrashAt(5))
    result = task.run(tiny_config(image_folder), out=crashed, resume=True)
    assert result.resumed_from == 4
    a, b = encoder_weights(uninterrupted), encoder_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("minutes", "log_every", "saved"), [
    (0.0, 1, [6]),  # only at the end
    (1e-9, 2, [2, 3, 4, 6]),  # due at every logged step: every 2nd step and each epoch's last (3 steps per epoch)
])
def test_checkpoints_follow_the_clock_at_logged_steps(image_folder, tmp_path, minutes, log_every, saved):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, checkpoint_minutes=minutes, log_every=log_every, keep_checkpoints=10)
    task.run(cfg, out=out)
    assert sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").iterdir()) == saved


class Recording(NoProgress):
    def __init__(self):
        self.updates: list[StepStats] = []

    def update(self, stats: StepStats) -> None:
        self.updates.append(stats)


def test_the_time_left_is_shown_from_the_first_step_before_the_first_logged_one(image_folder, tmp_path, caplog):
    """A run of slow steps shows its ETA after its first steps, not after the first logged one (10 steps in), and
    says once how long the rest should take; metrics.jsonl still holds the logged steps only."""
    out = tmp_path / "run"
    shown = Recording()
    with caplog.at_level("INFO", logger="simclr"):
        task.run(tiny_config(image_folder, batch_size=2, epochs=1, log_every=10), out=out, progress=shown)
    assert [s.step for s in shown.updates] == [1, 2, 3, 10, 12]  # 12 steps in the epoch
    first = shown.updates[0]
    assert first.seconds_left is not None and first.seconds_left > 0 and first.loss is None and first.epoch == 1
    assert shown.updates[-1].seconds_left == 0 and shown.updates[-1].loss is not None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [10, 12]
    assert len([r for r in caplog.records if r.getMessage().startswith("timed the first steps:")]) == 1
    assert "for the 9 steps left" in caplog.text


def test_a_cpu_run_sized_for_a_gpu_gets_a_hint_and_the_demo_none(image_folder, tmp_path, caplog):
    big = tiny_config(image_folder, max_steps=1)
    big.augment.image_size = 72  # above 64 px: the ImageNet-style recipe, which a CPU trains slowly
    with caplog.at_level("INFO", logger="simclr"):
        task.run(big, out=tmp_path / "big")
    assert "hint: resnet18 at 72 px is sized for a GPU; for a quick first run on this CPU add" in caplog.text
    assert "--arch resnet18 --width 0.5 --image-size 32 --epochs 20" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="simclr"):
        task.run(tiny_config(image_folder, max_steps=1), out=tmp_path / "small")
    assert "hint:" not in caplog.text
    resolved = defaults.resolve_sizes(PretrainConfig())  # the defaults: ResNet-50 at 224 px
    assert defaults.cpu_hint(resolved, device=torch.device("cpu")) is not None
    assert defaults.cpu_hint(resolved, device=torch.device("cuda")) is None


def test_resume_skips_a_damaged_newest_checkpoint(image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=out, progress=CrashAt(5))
    newest = out / "checkpoints" / "step-000000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # torn write
    with caplog.at_level("WARNING", logger="simclr"):
        result = task.run(tiny_config(image_folder, checkpoint_every=2), out=out, resume=True)
    assert result.resumed_from == 2
    assert "skipping step-000000004.safetensors" in caplog.text


def test_resume_refuses_a_changed_recipe(image_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=out, progress=CrashAt(3))
    changed = tiny_config(image_folder, checkpoint_every=2, temperature=0.2)
    with pytest.raises(ConfigError, match=r"--resume would change train.temperature from 0.5 to 0.2"):
        task.run(changed, out=out, resume=True)


def test_non_finite_loss_stops_before_saving_the_bad_step(image_folder, tmp_path, monkeypatch):
    real = simclr_method.nt_xent
    calls = []

    def nan_from_third_step(z1, z2, temperature):
        calls.append(1)
        loss = real(z1, z2, temperature)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(simclr_method, "nt_xent", nan_from_third_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="NaN/inf at step 3"):
        task.run(tiny_config(image_folder, checkpoint_every=1), out=out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000001.safetensors", "step-000000002.safetensors"]
    assert checkpoint.load_encoder(out / "encoder.safetensors")[1].step == 2
    assert all(torch.isfinite(t).all() for t in encoder_weights(out).values())


def test_batch_larger_than_the_dataset_is_refused_before_writing(image_folder, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, batch_size=32)
    with pytest.raises(DataError, match=r"--batch-size 32 is larger than the dataset \(24 images\)"):
        task.run(cfg, out=out)
    assert not out.exists()


def test_max_steps_ends_the_schedule_early(image_folder, tmp_path):
    result = task.run(tiny_config(image_folder, max_steps=2), out=tmp_path / "run")
    assert result.steps == 2
    assert checkpoint.load_encoder(tmp_path / "run" / "encoder.safetensors")[1].step == 2


def test_unset_batch_size_is_capped_at_the_dataset_and_saved_resolved(image_folder, tmp_path):
    cfg = tiny_config(image_folder, batch_size=None, epochs=1)
    result = task.run(cfg, out=tmp_path / "run")
    assert result.steps == 1  # 24 images, CPU default 64 capped to 24: one step per epoch
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["batch_size"] == 24


def test_monitor_knn_logs_accuracy_each_epoch(image_folder, tmp_path):
    from conftest import write_images

    labelled = tmp_path / "labelled"
    for seed, (split, count, label) in enumerate([("train", 4, "a"), ("train", 4, "b"), ("val", 2, "a"), ("val", 2, "b")]):
        write_images(labelled / split / label, count, size=16, seed=seed)
    cfg = tiny_config(image_folder)
    cfg.monitor.knn_data = str(labelled)
    task.run(cfg, out=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in records if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in checks] == [(3, 1), (6, 2)]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["knn_k"] == 8 for r in checks)  # k=20 capped at 8 train images


def test_monitor_with_bad_labelled_data_fails_before_writing(image_folder, tmp_path):
    cfg = tiny_config(image_folder)
    cfg.monitor.knn_data = str(tmp_path / "missing")
    with pytest.raises(DataError, match="neither a dataset name"):
        task.run(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_leaves_png_plots_when_matplotlib_is_installed(image_folder, tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tiny_config(image_folder, max_steps=3)
    task.run(cfg, out=tmp_path / "run")
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_init_starts_from_another_files_weights(image_folder, tmp_path):
    source_run = tmp_path / "source"
    task.run(tiny_config(image_folder, max_steps=2), out=source_run)
    source = encoder_weights(source_run)
    cfg = tiny_config(image_folder, max_steps=1, init=str(source_run / "encoder.safetensors"), seed=123)
    cfg.optim.lr = 1e-12  # one step that moves nothing measurable: the weights are the file's
    task.run(cfg, out=tmp_path / "run")
    started = encoder_weights(tmp_path / "run")
    convs = [k for k in source if k.endswith("conv1.weight")]
    assert convs and all(torch.allclose(started[k], source[k], atol=1e-6) for k in convs)
    fresh = build_model(defaults.resolve_sizes(tiny_config(image_folder)).model)
    assert not torch.allclose(fresh.state_dict()["encoder.conv1.weight"], source["encoder.conv1.weight"])


def test_tensorboard_events_are_written(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(image_folder, max_steps=2, tensorboard=True)
    task.run(cfg, out=tmp_path / "run")
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_without_the_package_is_a_clear_error(image_folder, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="--tensorboard needs the tensorboard package"):
        task.run(tiny_config(image_folder, max_steps=1, tensorboard=True), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _add_broken_images(folder: Path) -> list[Path]:
    broken = [folder / "zero.jpg", folder / "fake.png", folder / "truncated.png"]
    broken[0].write_bytes(b"")
    broken[1].write_bytes(b"this is not an image at all")
    good = next(folder.rglob("*.png")).read_bytes()
    broken[2].write_bytes(good[: len(good) // 2])
    return broken


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_images_are_skipped_named_and_listed(image_folder, tmp_path, caplog, workers):
    broken = _add_broken_images(image_folder)  # 27 files, 3 of them broken
    cfg = tiny_config(image_folder, batch_size=9, epochs=1)
    cfg.data.workers = workers
    with caplog.at_level("WARNING", logger="simclr"):
        result = task.run(cfg, out=tmp_path / "run")
    assert result.steps == 3  # batches keep their size: broken files are replaced, not dropped
    for path in broken:  # named by the main process, whichever process decoded them
        assert f"skipping {path}" in caplog.text
    report = [json.loads(line) for line in (tmp_path / "run" / "bad_files.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in report) == sorted(str(p) for p in broken)
    assert all(r["reason"] and r["kind"] == "file" for r in report)


def test_a_mostly_unreadable_folder_stops_the_run(tmp_path):
    folder = tmp_path / "junk"
    write_images(folder, 4, size=20)
    for i in range(12):
        (folder / f"junk_{i:02d}.jpg").write_bytes(b"not a jpeg")
    cfg = tiny_config(folder, batch_size=4, epochs=1)
    with pytest.raises(DataError, match=r"could not be decoded .*--max-bad-fraction 0.5"):
        task.run(cfg, out=tmp_path / "run")
    cfg.data.max_bad_fraction = 1.0  # the user says: train on what decodes
    assert task.run(cfg, out=tmp_path / "run2").steps == 4


def nan_at(steps: set[int]):
    """An nt_xent that returns NaN at the given (1-based) calls."""
    real = simclr_method.nt_xent
    calls = []

    def loss(z1, z2, temperature):
        calls.append(1)
        value = real(z1, z2, temperature)
        return value * float("nan") if len(calls) in steps else value

    return loss


def test_on_nonfinite_skip_drops_the_bad_update_and_goes_on(image_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(simclr_method, "nt_xent", nan_at({3}))
    cfg = tiny_config(image_folder, checkpoint_every=1, on_nonfinite="skip")
    with caplog.at_level("WARNING", logger="simclr"):
        result = task.run(cfg, out=tmp_path / "run")
    assert result.steps == 6
    assert "step 3: the loss or gradients are NaN/inf; update dropped" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in lines] == [False, False, True, False, False, False]
    assert all(torch.isfinite(t).all() for t in encoder_weights(tmp_path / "run").values())


def test_on_nonfinite_skip_leaves_the_weights_as_they_were(image_folder, tmp_path, monkeypatch):
    """A dropped update leaves every weight where the previous step put it (BN running statistics aside)."""
    cfg = tiny_config(image_folder, checkpoint_every=1, on_nonfinite="skip", max_steps=3)
    monkeypatch.setattr(simclr_method, "nt_xent", nan_at({3}))
    task.run(cfg, out=tmp_path / "skipped")
    before = load_file(str(tmp_path / "skipped" / "checkpoints" / "step-000000002.safetensors"))
    after = load_file(str(tmp_path / "skipped" / "checkpoints" / "step-000000003.safetensors"))
    params = [k for k in before if k.startswith("model/") and "running_" not in k and "num_batches" not in k]
    assert params and all(torch.equal(before[k], after[k]) for k in params)


def test_on_nonfinite_skip_gives_up_after_max_skips_in_a_row(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(simclr_method, "nt_xent", nan_at({2, 3, 4, 5, 6}))
    cfg = tiny_config(image_folder, checkpoint_every=1, on_nonfinite="skip", max_skips=3)
    with pytest.raises(NonFiniteLoss, match=r"3 updates in a row\) became NaN/inf at step 4"):
        task.run(cfg, out=tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in encoder_weights(tmp_path / "run").values())


class SignalAt(NoProgress):
    """A progress display that sends this process `signum` when told about `step` (preemption mid-run)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def update(self, stats: StepStats) -> None:
        if stats.step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_the_step_boundary_and_resume_is_bit_identical(image_folder, tmp_path, signum):
    uninterrupted = tmp_path / "a"
    task.run(tiny_config(image_folder), out=uninterrupted)
    stopped = tmp_path / "b"
    with pytest.raises(Stopped, match=rf"stopped by {signal.Signals(signum).name} at step 2/6 \(epoch 1/2\); saved .*step-000000002") as info:
        task.run(tiny_config(image_folder), out=stopped, progress=SignalAt(2, signum))
    assert info.value.exit_code == 128 + signum
    assert (stopped / "checkpoints" / "step-000000002.safetensors").exists()  # mid-epoch: not a scheduled save
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored after the run
    result = task.run(tiny_config(image_folder), out=stopped, resume=True)
    assert result.resumed_from == 2 and result.steps == 6
    a, b = encoder_weights(uninterrupted), encoder_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_torchrun_restart_resumes_by_itself(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=out, progress=CrashAt(5))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = task.run(tiny_config(image_folder, checkpoint_every=2), out=out)  # the same command, started again
    assert result.resumed_from == 4 and result.steps == 6


def test_a_second_run_on_a_locked_run_dir_is_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    with rundir.lock(out):
        with pytest.raises(ConfigError, match="in use by another simclr run"):
            task.run(tiny_config(image_folder), out=out, overwrite=True)
    assert task.run(tiny_config(image_folder), out=out, overwrite=True).steps == 6  # free again


def test_metrics_record_throughput_and_data_wait(image_folder, tmp_path):
    task.run(tiny_config(image_folder), out=tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["images_per_s"] > 0 and 0.0 <= r["data_wait"] <= 1.0 for r in lines)


def test_on_bad_image_error_stops_naming_the_file(image_folder, tmp_path):
    _add_broken_images(image_folder)
    cfg = tiny_config(image_folder, batch_size=9, epochs=1)
    cfg.data.on_bad_image = "error"
    with pytest.raises(DataError, match=r"cannot decode .*(zero\.jpg|fake\.png|truncated\.png).*--on-bad-image skip"):
        task.run(cfg, out=tmp_path / "run")


@pytest.mark.benchmark  # compiling takes a minute or two on a CPU: run with `pytest -m benchmark`
def test_compile_trains_the_same_model(image_folder, tmp_path):
    plain = task.run(tiny_config(image_folder, max_steps=3), out=tmp_path / "plain")
    compiled = task.run(tiny_config(image_folder, max_steps=3, compile=True), out=tmp_path / "compiled")
    assert compiled.steps == 3
    assert compiled.last_loss == pytest.approx(plain.last_loss, rel=1e-3)
    a, b = encoder_weights(tmp_path / "plain"), encoder_weights(tmp_path / "compiled")
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)


def test_resume_accepts_a_run_that_recorded_precision_as_auto():
    """Runs from before config.yaml held the resolved precision said "auto": whatever it resolves to now matches."""
    from simclr_cli.engine import resume

    resume.check_same_run({"train": {"precision": "auto"}}, {"train": {"precision": "bf16"}}, source=Path("step.safetensors"))
    with pytest.raises(ConfigError, match="train.precision from 'fp32' to 'bf16'"):
        resume.check_same_run({"train": {"precision": "fp32"}}, {"train": {"precision": "bf16"}}, source=Path("step.safetensors"))
