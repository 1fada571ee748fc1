"""`simclr pretrain` as a separate process: kill -9 then --resume, SIGTERM, and a folder of hostile files.

These run the real command line in a subprocess (the only way to kill it for real), on tiny settings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_hostile_folder, write_images

TINY = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu",
        "--precision", "fp32", "--set", "optim.warmup_epochs=0.5", "--set", "train.log_every=1"]


def simclr(*args: str) -> list[str]:
    return [sys.executable, "-m", "simclr_cli", *args]


def start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen(simclr(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(simclr(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder.safetensors"))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    write_images(root, 24, size=20)  # 3 steps per epoch at batch 8: checkpoints every 2 steps land mid-epoch
    return root


def test_kill_9_then_resume_with_other_workers_is_bit_identical(folder, tmp_path):
    run = ["pretrain", str(folder), *TINY, "--epochs", "4", "--checkpoint-every", "2"]
    done = finish([*run, "--workers", "0", "--out", str(tmp_path / "a")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    victim = start([*run, "--workers", "0", "--out", str(tmp_path / "b")], tmp_path)
    wait_for(tmp_path / "b" / "checkpoints" / "step-000000004.safetensors", victim)
    victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was being written is torn
    assert victim.wait(timeout=60) == -signal.SIGKILL
    newest = max(int(p.stem.split("-")[1]) for p in (tmp_path / "b" / "checkpoints").glob("step-*.safetensors"))
    assert newest < 12, "the run finished before it was killed"

    resumed = finish([*run, "--workers", "2", "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps after the checkpoint were logged again, once


def test_sigterm_saves_and_exits_143_then_resume_finishes(folder, tmp_path):
    out = tmp_path / "run"
    process = start(["pretrain", str(folder), *TINY, "--epochs", "6", "--workers", "1", "--out", str(out)], tmp_path)
    wait_for(out / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output  # 128 + SIGTERM, as documented
    assert "stopped by SIGTERM at step" in output and "Traceback" not in output
    assert f"simclr pretrain --resume --out {out}" in " ".join(output.split())
    stopped_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert stopped_at["event"] == "stopped by SIGTERM"
    assert (out / "checkpoints" / f"step-{stopped_at['step']:09d}.safetensors").exists()
    resumed = finish(["pretrain", str(folder), *TINY, "--epochs", "6", "--out", str(out), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'step-'}" in " ".join((resumed.stdout + resumed.stderr).split())


def test_pretrain_completes_on_a_hostile_folder_naming_every_skipped_file(tmp_path):
    root = tmp_path / "hostile"
    decoded, skipped = write_hostile_folder(root)
    out = tmp_path / "run"
    result = finish(["pretrain", str(root), *TINY, "--batch-size", "4", "--epochs", "2", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    for name in skipped:
        assert f"skipping {root / name}" in output.replace(f"{root}/ ", f"{root}/")
    report = [json.loads(line) for line in (out / "bad_files.jsonl").read_text().splitlines()]
    assert {Path(r["path"]).name: r["reason"] for r in report} == skipped


def test_pretrain_on_bad_image_error_stops_cleanly(tmp_path):
    root = tmp_path / "hostile"
    write_hostile_folder(root)
    out = tmp_path / "run"
    result = finish(["pretrain", str(root), *TINY, "--batch-size", "4", "--on-bad-image", "error", "--out", str(out)], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "error: cannot decode" in output and "--on-bad-image skip" in output and "Traceback" not in output
    assert not (out / "encoder.safetensors").exists()


def test_ctrl_c_to_the_whole_process_group_saves_with_workers_running_and_exits_130(folder, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, DataLoader workers included: the main process still
    saves at a step boundary and exits 130."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(simclr("pretrain", str(folder), *TINY, "--epochs", "6", "--workers", "2", "--out", str(out)),
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own process group, as a shell gives a foreground job
    wait_for(out / "metrics.jsonl", process)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "stopped by SIGINT at step" in output and "Traceback" not in output
    stopped_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert stopped_at["event"] == "stopped by SIGINT"
    assert (out / "checkpoints" / f"step-{stopped_at['step']:09d}.safetensors").exists()


def test_a_second_ctrl_c_exits_at_once():
    """The first SIGINT asks for a stop at the next step boundary; a second one does not wait for it."""
    from simclr_cli.engine.signals import stop_requests

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with pytest.raises(KeyboardInterrupt):
        with stop_requests() as request:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while request.signal is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert request.signal == signal.SIGINT  # the first one is a request, not an exit
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored afterwards
