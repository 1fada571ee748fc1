"""Stop requests: SIGTERM and SIGINT during training ask for a stop at the next step boundary, after a checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch

from simclr_cli.engine import distributed

log = logging.getLogger("simclr")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    """The stop signal received during training, if any (set by the handler, read at step boundaries)."""

    signal: int | None = None

    def agreed(self, world: distributed.World, *, step: int, every: int, device: torch.device) -> bool:
        """Whether every process has been asked to stop. One process checks after every step; several check every
        `every` steps (the logging steps, which already wait for each other), so a step never waits on the host."""
        if world.world_size == 1:
            return self.signal is not None
        if step % every:
            return False
        flag = torch.tensor(0 if self.signal is None else int(self.signal), device=device)
        agreed = int(distributed.all_reduce_max(flag).item())
        if agreed and self.signal is None:
            self.signal = agreed
        return bool(agreed)


@contextlib.contextmanager
def stop_requests():
    """While training, SIGTERM and SIGINT ask for a stop at the next step boundary instead of killing the run.

    A second signal of the same kind restores the default behaviour, so a user can still force an exit. Only the
    main thread can install handlers; elsewhere (a thread in a test harness) training simply runs without them.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signal is not None:
            signal.signal(signum, signal.SIG_DFL)  # a second request: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        request.signal = signum
        log.warning("%s received: stopping after this step, once a checkpoint is written", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
