"""The run's text log: `train.log` in the run folder (rank 0), and the plain step lines it holds.

Step lines (step/total, epoch, loss, lr, images/s, ETA) are the progress where no progress bar can draw: under
nohup or a scheduler, stderr is a file, and the CLI shows them there; on a terminal it leaves them to the bar
(`is_step_line`). train.log gets them either way, with every other "simclr" log line of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from simclr_cli.engine.plain import changed
from simclr_cli.engine.report import Progress, StepStats

log = logging.getLogger("simclr")

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# A step line at the first logged step, then at the first logged step at least this far from the last line, and
# at the end: a line every step of a fast run would bury the log, a line every N steps of a slow one starve it.
STEP_LINE_SECONDS = 30.0
STEP_LINE = "step_line"  # the attribute that marks a step line's LogRecord


def formatter() -> logging.Formatter:
    """How a log line reads in train.log and on a stderr that is not a terminal."""
    return logging.Formatter(FORMAT, datefmt=DATE_FORMAT)


def is_step_line(record: logging.LogRecord) -> bool:
    return bool(getattr(record, STEP_LINE, False))


def config_line(path: Path, config: dict, *, defaults: dict) -> str:
    """'config: run/config.yaml (not default: model.arch="resnet18", ...)': where the resolved config is, and what in
    it differs from the built-in defaults (values as YAML reads them back)."""
    different = ", ".join(f"{key}={json.dumps(value)}" for key, value in changed(config, defaults).items())
    return f"config: {path} (not default: {different or 'none'})"


class RunLog(logging.Handler):
    """The lines of one run for train.log: held in memory until the run folder holds a run (`open`), then appended
    to the file (a resumed run continues it), so a run that fails before writing anything leaves no file behind."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(formatter())
        self._pending: list[str] = []
        self._file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self._file is None:
                self._pending.append(line)
            else:
                self._file.write(line + "\n")
                self._file.flush()  # a run that is killed keeps every line it logged
        except Exception:  # noqa: BLE001 - logging's contract: a failed line never stops the run
            self.handleError(record)

    def open(self, path: Path) -> None:
        # backslashreplace: a file name that is not UTF-8 must not cost the log its line
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - closed in close()
        for line in self._pending:
            self._file.write(line + "\n")
        self._file.flush()
        self._pending = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


@contextlib.contextmanager
def recording() -> Iterator[RunLog]:
    """Copy the "simclr" log into a RunLog for the block; `open` it on the run's train.log once the run has begun."""
    handler = RunLog()
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        handler.close()


class StepLines:
    """A `Progress` that also logs step lines (see STEP_LINE_SECONDS for when) and passes every call on to `display`."""

    def __init__(self, display: Progress, *, images_per_step: int, every_s: float = STEP_LINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.display, self.images_per_step, self.every_s, self.clock = display, images_per_step, every_s, clock
        self._last: float | None = None

    def start(self, *, total_steps: int, completed: int, description: str) -> None:
        self._last = None
        self.display.start(total_steps=total_steps, completed=completed, description=description)

    def update(self, stats: StepStats) -> None:
        self.display.update(stats)
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s or stats.step >= stats.total_steps:
            self._last = now
            log.info("%s", step_line(stats, images_per_step=self.images_per_step), extra={STEP_LINE: True})

    def stop(self) -> None:
        self.display.stop()


def step_line(stats: StepStats, *, images_per_step: int) -> str:
    """"step 30/100 (30%), epoch 2, loss 4.1234, lr 0.03, 128.3 img/s, ETA 0:01:23" (ETA at the recent speed)."""
    loss = "-" if stats.loss is None else f"{stats.loss:.4f}"
    eta = "-"
    if stats.images_per_s > 0:
        eta = _clock((stats.total_steps - stats.step) * images_per_step / stats.images_per_s)
    done = 100 * stats.step / max(1, stats.total_steps)
    return (f"step {stats.step}/{stats.total_steps} ({done:.0f}%), epoch {stats.epoch}, loss {loss}, lr {stats.lr:.3g}, "
            f"{stats.images_per_s:.1f} img/s, ETA {eta}")


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
