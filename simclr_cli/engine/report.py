"""How tasks report progress: a small interface the CLI implements (with rich) and tests can record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepStats:
    """What the progress display shows after a step; `loss` is only read back from the device when logged."""

    step: int
    epoch: int | None  # 1-based: the epoch this step belongs to; None where there are no epochs (feature extraction)
    total_steps: int
    loss: float | None
    lr: float
    images_per_s: float
    data_wait: float | None = None  # fraction of the time since the last update spent waiting for the next batch
    seconds_left: float | None = None  # the task's own estimate (metrics.Pace); None: the display estimates it


class Progress(Protocol):
    def start(self, *, total_steps: int, completed: int, description: str) -> None: ...

    def update(self, stats: StepStats) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    """For callers that want no display."""

    def start(self, *, total_steps: int, completed: int, description: str) -> None:
        pass

    def update(self, stats: StepStats) -> None:
        pass

    def stop(self) -> None:
        pass
