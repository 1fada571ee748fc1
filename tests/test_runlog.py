"""runlog: when step lines are logged and what they say, and train.log holding the lines of a run that began."""

from __future__ import annotations

import logging

from simclr_cli.engine import runlog
from simclr_cli.engine.report import NoProgress, StepStats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stats(step: int, total: int = 100) -> StepStats:
    return StepStats(step=step, epoch=step // 10, total_steps=total, loss=4.5, lr=0.3, images_per_s=64.0)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_step_lines_at_the_first_update_then_every_30_seconds_and_at_the_end():
    clock = Clock()
    lines = runlog.StepLines(NoProgress(), images_per_step=32, clock=clock)
    lines.start(total_steps=100, completed=0, description="pretrain")
    log, recorder = logging.getLogger("simclr"), Recorder()
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(recorder)
    try:
        for step, seconds in ((10, 5), (20, 20), (30, 36), (40, 50), (50, 66), (100, 70)):
            clock.now = seconds
            lines.update(_stats(step))
    finally:
        log.removeHandler(recorder)
        log.setLevel(level)
    logged = [r for r in recorder.records if runlog.is_step_line(r)]
    assert [r.getMessage().split(",")[0] for r in logged] == ["step 10/100 (10%)", "step 30/100 (30%)", "step 50/100 (50%)",
                                                               "step 100/100 (100%)"]
    # 90 steps left at 64 img/s and 32 images a step: 45 s
    assert logged[0].getMessage() == "step 10/100 (10%), epoch 1, loss 4.5000, lr 0.3, 64.0 img/s, ETA 0:00:45"


def test_run_log_holds_lines_until_the_run_begins_then_appends(tmp_path):
    log = logging.getLogger("simclr")
    level = log.level
    log.setLevel(logging.INFO)
    try:
        with runlog.recording() as run_log:
            log.info("decoding 3 images")
            assert not (tmp_path / "train.log").exists()  # a run that fails here leaves no file
            run_log.open(tmp_path / "train.log")
            log.info("step 1/3")
        log.info("after the run")
    finally:
        log.setLevel(level)
    text = (tmp_path / "train.log").read_text()
    assert [line.split(" INFO ")[1] for line in text.splitlines()] == ["decoding 3 images", "step 1/3"]


def test_config_line_names_the_file_and_what_differs_from_the_defaults(tmp_path):
    defaults = {"model": {"arch": "resnet50", "width": 1.0}, "train": {"device": "auto", "seed": 0}}
    config = {"model": {"arch": "resnet18", "width": 1.0}, "train": {"device": "cpu", "seed": 0}}
    assert runlog.config_line(tmp_path / "config.yaml", config, defaults=defaults) == (
        f'config: {tmp_path / "config.yaml"} (not default: model.arch="resnet18", train.device="cpu")')
    assert runlog.config_line(tmp_path / "c.yaml", defaults, defaults=defaults).endswith("(not default: none)")
