"""The metrics a run logs: metrics.jsonl (one JSON object a line), optionally mirrored as TensorBoard events."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.files import atomic_write, writing

log = logging.getLogger("simclr")


def require_tensorboard():
    """TensorBoard's SummaryWriter, or a one-line error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install tensorboard (or the [tensorboard] extra)") from exc
    return SummaryWriter


class MetricsLog:
    """Appends records to `path`; with `events_dir`, numbers other than step, epoch and time also go to TensorBoard
    under `<prefix>/<key>`. Only the main process makes one."""

    def __init__(self, path: Path, *, events_dir: Path | None = None, prefix: str = "pretrain") -> None:
        self.path, self.prefix = path, prefix
        self.events = require_tensorboard()(log_dir=str(events_dir)) if events_dir is not None else None

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path, kept="the lines already logged are intact"):
            append_line(self.path, json.dumps(record))
        if self.events is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)):
                    self.events.add_scalar(f"{self.prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class Throughput:
    """Images per second and the fraction of the time spent waiting for data, over the steps since the last `take`."""

    def __init__(self, *, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def stepped(self) -> None:
        self.steps += 1

    def take(self) -> tuple[float, float]:
        """(images/s, data-wait fraction) of the window, which starts again."""
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        rates = self.steps * self.images_per_step / seconds, min(1.0, self.wait / seconds)
        self.start, self.steps, self.wait = now, 0, 0.0
        return rates


class Pace:
    """Seconds per step and the time left, timed from the end of a session's first step: that step also pays for
    warm-up (allocation, compilation, the first decode), so from the second one on the estimate holds. Read it only
    where the host has waited for the device (a logged step), or the time is the launch time, not the work's."""

    FIRST_STEPS = 3  # a session's first steps are always timed, so an estimate shows before the first logged step

    def __init__(self, *, start_step: int, total_steps: int) -> None:
        self.start_step, self.total_steps = start_step, total_steps
        self.started = time.perf_counter()
        self.first_done: float | None = None  # when the session's first step ended

    def early(self, step: int) -> bool:
        """Whether `step` (1-based, just done) is one of the session's first steps, timed with a host sync."""
        return step - self.start_step <= self.FIRST_STEPS

    def stepped(self, step: int) -> None:
        if self.first_done is None and step > self.start_step:
            self.first_done = time.perf_counter()

    def seconds_per_step(self, step: int) -> float | None:
        """The mean over the session's steps after its first (the first step alone while it is the only one)."""
        done = step - self.start_step
        if done < 1 or self.first_done is None:
            return None
        now = time.perf_counter()
        return (now - self.started) if done == 1 else (now - self.first_done) / (done - 1)

    def seconds_left(self, step: int) -> float | None:
        per_step = self.seconds_per_step(step)
        return None if per_step is None else per_step * (self.total_steps - step)


def clock(seconds: float) -> str:
    """H:MM:SS, as a progress bar shows time."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def append_line(path: Path, line: str) -> None:
    """Append `line` and its newline whole or not at all: a failed or short write (a full disk) is cut off again, so
    the file ends with the last complete line."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except BaseException:
            os.ftruncate(fd, size)  # a torn line would make the log unreadable for --resume
            raise
    finally:
        os.close(fd)


def _record(line: str) -> dict[str, Any] | None:
    """The record on one line of metrics.jsonl, or None when the line is torn or not a record."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def truncate(path: Path, *, after_step: int) -> None:
    """Drop the records logged after `after_step` (a resumed run logs those steps again), and any torn or unparsable
    line (a write cut short by a full disk or a crash), with a warning."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = [(line, _record(line)) for line in lines]
    bad = [number for number, (_, record) in enumerate(records, 1) if record is None]
    if bad:
        log.warning("%s: dropped %d torn or unreadable line(s) (line %s), e.g. from a write cut short by a full disk",
                    path, len(bad), ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else ""))
    kept = [line for line, record in records if record is not None and record["step"] <= after_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))
