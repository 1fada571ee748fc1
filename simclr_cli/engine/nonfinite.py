"""The non-finite guard: a NaN/inf loss stops the run before anything from that step on is saved, or, with
on_nonfinite=skip, the update is dropped (at most `max_skips` in a row). Every process agrees (DINO fails fast too)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from simclr_cli.engine import distributed
from simclr_cli.engine.errors import NonFiniteLoss

log = logging.getLogger("simclr")

POLICIES = ("abort", "skip")  # train.on_nonfinite


class NonFiniteGuard:
    """Watches each step's loss without syncing the host; `check` (at logging and saving steps, which every process
    reaches together) raises for the first bad step any process saw."""

    def __init__(self, policy: str, *, max_skips: int, device: torch.device) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.skips = 0  # updates dropped in a row
        # First step whose loss was not finite, kept on the device so the step never waits on the host.
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def update_ok(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], *, step: int) -> bool:
        """on_nonfinite=skip: every process checks its loss and gradients, and all drop the update if any is bad.
        Always True under abort (the loss is checked later, by `check`)."""
        if self.policy != "skip":
            return True
        grads = [p.grad for p in params if p.grad is not None]
        finite = torch.isfinite(loss) & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        bad = int(distributed.all_reduce_max((~finite).to(torch.int64)).item())  # one host sync per step, in skip mode only
        if not bad:
            self.skips = 0
            return True
        self.skips += 1
        log.warning("step %d: the loss or gradients are NaN/inf; update dropped (%d in a row, at most %d)",
                    step + 1, self.skips, self.max_skips)
        if self.skips >= self.max_skips:
            raise NonFiniteLoss(step + 1, what=f"the loss or gradients ({self.skips} updates in a row)")
        return False

    def record(self, loss: torch.Tensor, *, step: int) -> None:
        """Remember 0-based `step` if its applied update came from a non-finite loss (numbered like metrics.jsonl)."""
        finite = torch.isfinite(loss)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, step + 1, self.bad_step)  # no host round trip

    def check(self) -> None:
        """Stop if any rank saw a non-finite loss; every rank calls this at the same steps, so all stop together."""
        bad = int(distributed.all_reduce_max(self.bad_step).item())
        if bad >= 0:
            raise NonFiniteLoss(bad)
