"""The command line at its boundary: what the engine receives, what users see on bad input, and a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from simclr_cli import launcher
from simclr_cli.cli import app
from simclr_cli.engine.tasks import pretrain as task

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    """Replace the pretraining task with a recorder: the test sees exactly the config the CLI resolved."""
    calls = []

    def fake_run(cfg, *, out, resume=False, overwrite=False, progress=None):
        calls.append({"cfg": cfg, "out": out, "resume": resume, "overwrite": overwrite})
        raise SystemExit(0)

    monkeypatch.setattr(task, "run", fake_run)
    return calls


def test_help_lists_pretrain():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "pretrain" in result.output


def test_no_data_means_the_demo_preset(captured):
    runner.invoke(app, ["pretrain"])
    cfg = captured[0]["cfg"]
    assert cfg.data.source == "digits"
    assert (cfg.model.arch, cfg.model.width, cfg.augment.image_size) == ("resnet18", 0.5, 16)


def test_flags_override_the_preset_which_overrides_defaults(captured, tmp_path):
    runner.invoke(app, ["pretrain", str(tmp_path), "--preset", "cifar10", "--batch-size", "64", "--temperature", "0.2",
                        "--arch", "resnet34", "--lr-scaling", "sqrt", "--set", "augment.crop_scale=[0.2, 1.0]",
                        "--set", "train.batch_size=32", "--out", str(tmp_path / "o")])
    cfg = captured[0]["cfg"]
    assert cfg.data.source == str(tmp_path)  # DATA beats the preset's dataset
    assert cfg.train.batch_size == 64  # a named flag beats --set, which beats the preset
    assert cfg.train.temperature == 0.2 and cfg.model.arch == "resnet34" and cfg.optim.lr_scaling == "sqrt"
    assert cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.augment.image_size == 32  # from the preset
    assert cfg.optim.name == "lars" and cfg.train.epochs == 1000  # untouched preset values
    assert captured[0]["out"] == tmp_path / "o"


def test_folder_without_preset_gets_imagenet_size_defaults(captured, tmp_path):
    runner.invoke(app, ["pretrain", str(tmp_path)])
    cfg = captured[0]["cfg"]
    assert cfg.augment.image_size == 224 and cfg.model.arch == "resnet50" and cfg.data.source == str(tmp_path)


def one_line_error(result) -> str:
    """The error a user sees: exit 2, a single line starting with 'error:', no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "/no/such/folder"], "neither a dataset name nor an existing folder"),
        (["pretrain", "--preset", "nope"], "unknown preset 'nope'; choose one of"),
        (["pretrain", "--arch", "resnet19"], "model.arch 'resnet19' is not supported"),
        (["pretrain", "--temperature", "0"], "train.temperature 0.0 must be > 0"),
        (["pretrain", "--set", "model.depth=3"], "unknown config key 'model.depth'"),
        (["pretrain", "--set", "nonsense"], "is not KEY=VALUE"),
        (["pretrain", "--set", "augment.blur_p="], "--set 'augment.blur_p=' has no value; write augment.blur_p=VALUE"),
        (["pretrain", "--device", "tpu"], "unknown device 'tpu'"),
        (["pretrain", "--batch-size", "4096"], "--batch-size 4096 is larger than the dataset (1797 images)"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, expected, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert expected in one_line_error(result)
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_empty_folder_and_bad_preset_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no images" in one_line_error(runner.invoke(app, ["pretrain", str(empty)]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 12\n")
    message = one_line_error(runner.invoke(app, ["pretrain", "--preset", str(bad)]))
    assert "unknown config key 'train.batch_sise'" in message


def test_verbose_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["pretrain", "--arch", "resnet19", "--verbose", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_pretrain_end_to_end_then_refuse_then_resume(image_folder, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
            "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "encoder.safetensors").is_file()
    assert "loss" in result.output and str(out / "encoder.safetensors") in result.output.replace("\n", "")
    # a second run into the same folder would clobber it
    assert "already holds a run" in one_line_error(runner.invoke(app, args))
    # resuming a finished run says so, without decoding the data again
    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert f"already complete: {out} finished all 3 steps; nothing to resume" in said
    assert "decoding" not in said and "pretraining" not in said
    overwritten = runner.invoke(app, [*args, "--overwrite"])
    assert overwritten.exit_code == 0, overwritten.output


TINY_RUN = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu",
            "--precision", "fp32", "--workers", "0"]


def test_epochs_are_counted_from_1_everywhere(image_folder, tmp_path):
    """One convention: "epoch N" is the N-th epoch, counted from 1, which at its last step is the number of epochs
    completed; after a run of 2 epochs the summary, metrics.jsonl, the kNN monitor and `info` all say 2."""
    from conftest import write_images

    labelled = tmp_path / "labelled"
    for seed, (split, label) in enumerate([("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")]):
        write_images(labelled / split / label, 4 if split == "train" else 2, size=16, seed=seed)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(image_folder), *TINY_RUN, "--epochs", "2", "--monitor-knn", str(labelled),
                                 "--set", "train.log_every=1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "done 6 steps (2 epochs)" in said
    assert "epoch 1: kNN top-1" in said and "epoch 2: kNN top-1" in said and "epoch 0" not in said
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 1, 1, 2, 2, 2]
    assert [(r["step"], r["epoch"]) for r in records if "knn_top1" in r] == [(3, 1), (6, 2)]
    shown = _plain(runner.invoke(app, ["info", str(out / "encoder.safetensors")]).output)
    assert "step 6, epoch 2" in shown


def test_pretrain_states_its_plan_and_its_checkpoint_cadence_goes_into_config_yaml(image_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(image_folder), *TINY_RUN, "--epochs", "2", "--checkpoint-minutes", "0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = _plain(result.output)
    assert "pretraining simclr: resnet18 (width 0.25, small stem, 0.7M parameters) at 16 px on 24 images; " \
           "2 epochs of 3 steps = 6 steps of batch 8" in said
    assert "fp32 on cpu, 0 data workers; a checkpoint at the end" in said
    assert said.index("pretraining simclr:") < said.index("timed the first steps:") < said.index("done 6 steps")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["checkpoint_minutes"] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000006.safetensors"]


def test_python_dash_m_runs_the_same_app():
    result = subprocess.run([sys.executable, "-m", "simclr_cli", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.strip().startswith("simclr ")


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [[], ["--method", "moco-v2", "--set", "moco.K=12"]], ids=["simclr", "moco-v2"])
def test_two_processes_log_the_same_losses_as_one(method, image_folder, tmp_path):
    """--gpus 2 --device cpu: gloo workers through torchrun, global batch split in two, same maths as one process
    (for MoCo: the queue filled from both processes' keys in rank order, global BN in both encoders).

    LARS, not the small-image default SGD: the processes sum in another order, and SGD's large relative steps on this
    tiny network amplify that float rounding step by step (1e-6 at step 1, ~1% at step 4), while LARS's trust ratio
    keeps every step small, so 4 steps still compare at 1e-3."""
    args = ["pretrain", str(image_folder), *method, "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
            "--batch-size", "8", "--max-steps", "4", "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--optimizer", "lars", "--set", "train.log_every=1"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--gpus", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(double) == 4
    assert all(abs(a - b) / abs(a) < 1e-3 for a, b in zip(single, double))
    assert two.stdout.count("done 4 steps") == 1  # only rank 0 reports
    # one decoded-image cache in /dev/shm for both processes (or one each, said so, without /dev/shm)
    shared = "cached 24 images in " in two.stderr and "shared by this machine's 2 process(es)" in two.stderr
    assert shared or "no shared memory at" in two.stderr


def test_a_taken_run_folder_is_refused_once_before_any_worker_starts(image_folder, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25",
         "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--gpus", "2", "--out", str(taken)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: {taken} already holds a run; pass --resume to continue it, --overwrite to start over, or another --out"]


def _no_launch(*args, **kwargs):
    raise AssertionError("worker processes were started for a run that cannot work")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpus_without_a_gpu_is_refused_unless_device_cpu(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch", _no_launch)
    message = one_line_error(runner.invoke(app, ["pretrain", str(image_folder), "--batch-size", "4096", "--gpus", "8",
                                                 "--out", str(tmp_path / "run")]))
    assert message == ("error: --gpus 8 but PyTorch sees no GPU on this machine; pass --device cpu to run 8 CPU processes "
                       "(gloo), or drop --gpus")
    message = one_line_error(runner.invoke(app, ["embed", str(image_folder), "-o", str(tmp_path / "v.npy"), "--gpus", "2"]))
    assert "--gpus 2 but PyTorch sees no GPU" in message
    # compare and cka go through the same check as the other evaluation commands
    for command in (["compare", "enc.safetensors", "--data", str(image_folder)], ["cka", "enc.safetensors"]):
        assert "--gpus 2 but PyTorch sees no GPU" in one_line_error(runner.invoke(app, [*command, "--gpus", "2"]))
        assert one_line_error(runner.invoke(app, [*command, "--gpus", "-1"])) == "error: --gpus -1 must be >= 1 (no GPU: --device cpu)"
    # --gpus 0 is refused, not run as one process on whatever device "auto" finds
    assert one_line_error(runner.invoke(app, ["embed", str(image_folder), "-o", str(tmp_path / "v.npy"), "--gpus", "0"])) \
        == "error: --gpus 0 must be >= 1 (no GPU: --device cpu)"
    assert "--gpus and --nodes must be >= 1" in one_line_error(runner.invoke(app, ["pretrain", str(image_folder), "--gpus", "0",
                                                                                  "--out", str(tmp_path / "run")]))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "4096", "--gpus", "8"], "--batch-size 4096 is larger than the dataset (24 images)"),
        (["--batch-size", "9", "--gpus", "2"], "--batch-size 9 (the global batch) does not split evenly over 2 processes"),
        (["--batch-size", "6", "--gpus", "2", "--nodes", "2"], "does not split evenly over 4 processes"),
        (["--gpus", "2", "--device", "mps"], "not mps; pass --device cpu"),
    ],
)
def test_the_launcher_checks_the_batch_once_before_starting_workers(args, expected, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch", _no_launch)
    result = runner.invoke(app, ["pretrain", str(image_folder), "--device", "cpu", *args, "--out", str(tmp_path / "run")])
    assert expected in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_several_machines_need_one_run_folder_named(image_folder, monkeypatch):
    """Each machine would otherwise name its own runs/<timestamp>/ from its own clock."""
    monkeypatch.setattr(launcher, "launch", _no_launch)
    result = runner.invoke(app, ["pretrain", str(image_folder), "--device", "cpu", "--batch-size", "8", "--gpus", "2",
                                 "--nodes", "2"])
    assert one_line_error(result) == ("error: --nodes 2 needs --out: every machine must write to the same run folder, "
                                      "on storage they all share (e.g. --out /shared/runs/r50)")


def test_the_launcher_checks_the_data_before_starting_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch", _no_launch)
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, expected in ((tmp_path / "nothing", "neither a dataset name nor an existing folder"), (empty, "has no images")):
        result = runner.invoke(app, ["pretrain", str(data), "--device", "cpu", "--gpus", "2", "--out", str(tmp_path / "run")])
        assert expected in one_line_error(result)


def test_names_holding_markup_print_as_themselves(image_folder, tmp_path):
    """A path with `[/]` or `[bold]` in it is text, never rich markup (which raised MarkupError or lost the brackets)."""
    for name in ("enc[/]oder.safetensors", "[bold]encoder.safetensors"):
        message = one_line_error(runner.invoke(app, ["info", str(tmp_path / name)]))
        assert f"checkpoint {tmp_path / name} does not exist" in message
    out = tmp_path / "[bold]run[/]"
    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
                                 "--batch-size", "8", "--max-steps", "1", "--device", "cpu", "--precision", "fp32",
                                 "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"encoder: {out / 'encoder.safetensors'}" in result.stdout.splitlines()
    info = runner.invoke(app, ["info", str(out / "encoder.safetensors")])
    assert info.exit_code == 0 and str(out / "encoder.safetensors") in info.stdout


def test_config_yaml_records_what_auto_became(image_folder, tmp_path):
    """No --device, --precision or --workers: config.yaml holds the device, precision and workers that ran, and a
    resume reads them back."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
                                 "--batch-size", "8", "--max-steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert saved["train"]["precision"] in ("fp32", "bf16", "fp16") and isinstance(saved["data"]["workers"], int)
    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output


def test_results_on_stdout_logs_and_step_lines_on_stderr_and_in_train_log(image_folder, tmp_path):
    """Under nohup or a scheduler (stderr a file): stdout holds the summary alone; stderr the log with plain step
    lines, as train.log does."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25",
         "--image-size", "16", "--batch-size", "8", "--max-steps", "3", "--set", "train.log_every=1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout.splitlines()
    assert stdout[0].startswith("done 3 steps") and f"encoder: {out / 'encoder.safetensors'}" in stdout
    assert not [line for line in stdout if " INFO " in line or line.startswith("step ")]
    assert f"INFO config: {out / 'config.yaml'} (not default: data.source=" in result.stderr
    log = (out / "train.log").read_text()
    for text in (result.stderr, log):
        assert "INFO pretraining simclr: resnet18" in text and "step 3/3 (100%), epoch 1, loss " in text and "img/s, ETA 0:00:00" in text
    version = subprocess.run([sys.executable, "-m", "simclr_cli", "--version"], capture_output=True, text=True, check=False)
    assert version.stdout.startswith("simclr ") and version.stderr == ""


def test_step_lines_stay_off_a_terminal_where_the_progress_bar_shows_them(monkeypatch):
    import logging

    from simclr_cli import console as ui
    from simclr_cli.engine import runlog

    monkeypatch.setattr(ui, "live_display", lambda: True)
    ui.setup_logging(verbose=False)
    (handler,) = logging.getLogger("simclr").handlers
    step = logging.LogRecord("simclr", logging.INFO, __file__, 1, "step 1/3", None, None)
    setattr(step, runlog.STEP_LINE, True)
    other = logging.LogRecord("simclr", logging.INFO, __file__, 1, "pretraining resnet18", None, None)
    assert not handler.filter(step) and handler.filter(other)


def test_batch_must_split_over_the_processes(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(task.distributed, "init", lambda world, **kw: None)
    result = runner.invoke(app, ["pretrain", str(image_folder), "--batch-size", "8", "--device", "cpu",
                                 "--out", str(tmp_path / "r")])
    assert "does not split evenly over 3 processes" in one_line_error(result)


def test_resume_on_another_number_of_processes(image_folder, tmp_path):
    """A run checkpointed by one process continues on two with the same losses."""
    args = ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
            "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--set", "train.log_every=1", "--set", "train.keep_checkpoints=3", "--checkpoint-every", "2"]
    whole = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    part = tmp_path / "part"
    runner.invoke(app, [*args, "--out", str(part)])
    for late in ("step-000000006.safetensors", "step-000000004.safetensors"):
        (part / "checkpoints" / late).unlink()  # as if the run had died after step 2
    assert (part / "checkpoints" / "step-000000002.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "--resume", "--out", str(part), "--gpus", "2",
                              "--device", "cpu", "--workers", "0"], capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(tmp_path / "whole"), _losses(part)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) / abs(x) < 1e-3 for x, y in zip(a, b))


def test_a_bad_image_in_a_worker_is_still_a_one_line_error(image_folder, tmp_path):
    (image_folder / "fake.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
                                 "--batch-size", "25", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
                                 "--workers", "1", "--on-bad-image", "error", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot decode" in errors[0] and "fake.png" in errors[0]
    assert "Original Traceback" not in result.output


@pytest.mark.parametrize("data_wait", [None, 0.25])
def test_progress_bar_shows_images_per_second_and_data_wait(data_wait, monkeypatch):
    from rich.console import Console

    from simclr_cli import console as ui
    from simclr_cli.engine.report import StepStats

    screen = Console(record=True, force_terminal=True, width=200)
    monkeypatch.setattr(ui, "console", screen)
    bar = ui.RichProgress()
    bar.start(total_steps=10, completed=0, description="pretrain")
    bar.update(StepStats(step=3, epoch=0, total_steps=10, loss=5.25, lr=0.1, images_per_s=123.4, data_wait=data_wait))
    bar.stop()
    text = screen.export_text()
    assert "123.4 img/s" in text and "loss 5.2500" in text
    assert ("data wait 25%" if data_wait else "data wait -") in text


def test_progress_bar_shows_the_tasks_own_time_left_after_one_slow_step(monkeypatch):
    """A 40-second step leaves rich's own estimate (a 30-second window of updates) blank; the task's is shown."""
    from rich.console import Console

    from simclr_cli import console as ui
    from simclr_cli.engine.report import StepStats

    screen = Console(record=True, force_terminal=True, width=200)
    monkeypatch.setattr(ui, "console", screen)
    bar = ui.RichProgress()
    bar.start(total_steps=100, completed=0, description="pretrain")
    bar.update(StepStats(step=1, epoch=1, total_steps=100, loss=None, lr=0.1, images_per_s=0.7, seconds_left=3725.0))
    bar.stop()
    assert "eta 1:02:05" in screen.export_text()


# --- --help: every default shown, examples that use real options, no placeholder on flags (issue 16, item 12) ------

COMMANDS = ["pretrain", "benchmark", "linear-eval", "knn", "finetune", "embed", "export", "info", "compare"]
# Options with nothing to default to: switches off unless given, and inputs nothing stands in for.
NO_DEFAULT = {"--help", "--verbose", "--resume", "--overwrite", "--random-init", "--json", "--include-fc", "--set", "--train",
              "--val", "--index", "--query", "--label-file", "--init", "--master-addr"}


def _help(command: str) -> tuple[dict[str, str], list[str]]:
    """A command's --help as {long option: its entry} and the example command lines of its epilog."""
    result = runner.invoke(app, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    entries: list[list[str]] = []
    examples: list[str] = []
    section = None
    for line in result.output.splitlines():
        if line.strip() in ("Options:", "Examples:"):
            section = line.strip()
        elif section == "Options:" and line.startswith("  -"):
            entries.append([line.strip()])
        elif section == "Options:" and line.strip() and entries:
            entries[-1].append(line.strip())
        elif section == "Examples:" and line.strip():
            examples.append(line.split("#")[0].strip())
    options = {next(word for word in e[0].replace(",", " ").split() if word.startswith("--")): " ".join(e) for e in entries}
    return options, examples


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default_and_examples_that_use_real_options(command):
    options, examples = _help(command)
    missing = [name for name, text in options.items()
               if name not in NO_DEFAULT and "default" not in text.lower() and "[required]" not in text]
    assert not missing, f"simclr {command} --help states no default for {missing}"
    assert 1 <= len(examples) <= 3 and all(line.startswith(f"simclr {command}") for line in examples), examples
    heads = {word for text in options.values() for word in text.replace(",", " ").replace("/", " ").split()[:4] if word.startswith("-")}
    for line in examples:
        for word in line.split():
            if word.startswith("-"):
                assert word in heads, f"{line!r} uses {word}, which simclr {command} does not have"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_puts_no_type_placeholder_on_flags(command):
    shown = runner.invoke(app, [*([command] if command else []), "--help"]).output
    assert "<bool>" not in shown


def test_help_states_the_defaults_a_bare_pretrain_runs_with():
    options, _ = _help("pretrain")
    assert "resnet50; the demo: resnet18" in options["--arch"]
    assert "224; 32 for CIFAR and digits, 96 for STL-10" in options["--image-size"]
    assert "100; the demo: 15" in options["--epochs"]
    assert "256 on a GPU, 64 on a CPU" in options["--batch-size"]
    assert "(auto)" in options["--device"] and "(auto)" in options["--precision"] and "--no-compile" in options["--compile"]


# --- one entry per command: --batch-size, --preset/--set for every command, --method ---------------------------------


def _plain(text: str) -> str:
    """Help text without the panel borders and line breaks rich adds."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", ["knn", "linear-eval", "finetune", "embed"])
def test_batch_size_help_is_true_for_each_command(command):
    shown = _plain(runner.invoke(app, [command, "--help"]).output)
    assert "--batch-size" in shown
    assert "2 views" not in shown and "negatives" not in shown  # what pretraining's batch means, not this command's
    assert "2 views" in _plain(runner.invoke(app, ["pretrain", "--help"]).output)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "--batch-size", "0"], "train.batch_size must be >= 2"),
        (["knn", "--batch-size", "0"], "knn.batch_size 0 must be a whole number >= 1"),
        (["linear-eval", "--batch-size", "0"], "linear_eval.batch_size 0 must be a whole number >= 1"),
        (["finetune", "--batch-size", "0"], "finetune.batch_size 0 must be a whole number >= 1"),
        (["embed", "somewhere", "-o", "v.npy", "--batch-size", "0"], "embed.batch_size 0 must be a whole number >= 1"),
        (["knn", "--index", "v.npy", "--query", "q.png", "--batch-size", "0"], "retrieval.batch_size 0 must be a whole number >= 1"),
    ],
)
def test_batch_size_0_is_an_error_everywhere(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in one_line_error(runner.invoke(app, args))


@pytest.fixture
def knn_captured(monkeypatch):
    """The knn task replaced by a recorder of the config the CLI resolved."""
    from simclr_cli.engine.tasks import knn as knn_task

    calls = []
    monkeypatch.setattr(knn_task, "run", lambda cfg, **kwargs: calls.append(cfg))
    return calls


def test_eval_commands_take_presets_and_sets_with_the_same_precedence(knn_captured, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  arch: resnet18\nknn:\n  k: [7]\n  batch_size: 32\n  temperature: 0.3\n")
    result = runner.invoke(app, ["knn", "--preset", str(recipe), "--set", "knn.temperature=0.2", "--set", "knn.k=[9, 11]",
                                 "-k", "5"])
    assert result.exit_code == 0, result.output
    cfg = knn_captured[0]
    assert cfg.k == (5,)  # a flag beats --set, which beats the preset
    assert cfg.temperature == 0.2 and cfg.batch_size == 32  # --set beats the preset; the preset beats the default
    assert cfg.workers is None and cfg.layer == "encoder"  # untouched defaults ("auto" workers until the run opens)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["knn", "--set", "model.arch=resnet18"], "unknown config key 'model'; this command's keys are knn.*"),
        (["knn", "--set", "knn.neighbours=5"], "unknown config key 'knn.neighbours'; valid keys in knn:"),
        (["linear-eval", "--set", "linear_eval.protocol=magic"], "linear_eval.protocol 'magic' is not supported"),
        (["embed", "x", "-o", "v.npy", "--set", "embed.layer=fc"], "embed.layer 'fc' is not one of"),
    ],
)
def test_eval_sets_are_checked_like_pretrains(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in one_line_error(runner.invoke(app, args))


def test_a_preset_with_eval_sections_still_pretrains_and_typos_are_caught(captured, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 3\nknn:\n  k: [20]\nlinear_eval:\n  protocol: paper\n")
    runner.invoke(app, ["pretrain", "--preset", str(recipe)])
    assert captured[0]["cfg"].train.epochs == 3  # the evaluation sections are for the evaluation commands
    recipe.write_text("knnn:\n  k: [20]\n")
    assert "unknown config key 'knnn'" in one_line_error(runner.invoke(app, ["knn", "--preset", str(recipe)]))


def test_pretrain_method_defaults_to_simclr_and_names_only_known_methods(captured, tmp_path):
    runner.invoke(app, ["pretrain"])
    assert captured[0]["cfg"].train.method == "simclr"
    runner.invoke(app, ["pretrain", "--method", "simclr"])
    assert captured[1]["cfg"].train.method == "simclr"


def test_an_unknown_method_is_one_line(tmp_path):
    result = runner.invoke(app, ["pretrain", "--method", "moco", "--out", str(tmp_path / "run")])
    assert "method 'moco' is not supported; choose one of simclr" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_two_processes_end_with_one_bad_files_report_and_results_on_stdout(image_folder, tmp_path):
    """--gpus 2: both ranks' bad files in one bad_files.jsonl, counted in one warning; results on stdout, logs (and no
    torchrun banner) on stderr, train.log in the run folder."""
    fakes = [image_folder / "a" / "img_000x.png", image_folder / "a" / "img_005x.png", image_folder / "a" / "img_010x.png",
             image_folder / "b" / "c" / "img_005x.png"]  # between good images: each replaced alone, by whichever rank draws it
    for fake in fakes:
        fake.write_text("not an image")
    out = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # torchrun's banner case
    result = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25",
         "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
         "--workers", "0", "--gpus", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    listed = [json.loads(line)["path"] for line in (out / "bad_files.jsonl").read_text().splitlines()]
    assert sorted(listed) == sorted(map(str, fakes))  # each once
    assert sorted(p.name for p in out.glob("bad_files*")) == ["bad_files.jsonl"]
    warnings = [line for line in result.stderr.splitlines() if "4 bad file(s)" in line]
    assert len(warnings) == 1 and str(out / "bad_files.jsonl") in warnings[0]
    assert "OMP_NUM_THREADS" not in result.stderr
    assert result.stdout.count("done 7 steps") == 1 and "pretraining simclr: resnet18" not in result.stdout
    assert "pretraining simclr: resnet18" in (out / "train.log").read_text()
