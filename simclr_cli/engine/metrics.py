"""The metrics a run logs: metrics.jsonl (one JSON object a line), optionally mirrored as TensorBoard events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.files import atomic_write, writing


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
        with writing(self.path, kept="the lines already logged are intact"), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
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


def truncate(path: Path, *, after_step: int) -> None:
    """Drop the records logged after `after_step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= after_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))
