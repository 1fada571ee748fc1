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

    def snapshot(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """on_nonfinite=skip: a copy of `module`'s buffers (BN running statistics, num_batches_tracked) before the
        step's forward pass writes them, for `restore` when the update is dropped. None under abort."""
        if self.policy != "skip":
            return None
        return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}

    @staticmethod
    def restore(module: torch.nn.Module, snapshot: dict[str, torch.Tensor] | None) -> None:
        """Put back the buffers `snapshot` copied: a dropped step leaves the model exactly as it was before it."""
        if snapshot is None:
            return
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(snapshot[name])

    def update_ok(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], *, step: int,
                  buffers: Iterable[torch.Tensor] = ()) -> bool:
        """on_nonfinite=skip: every process checks its loss, gradients and the buffers the forward pass just wrote
        (BN statistics), and all drop the update if any is bad. Always True under abort (`check` and the save's
        finiteness check catch it later)."""
        if self.policy != "skip":
            return True
        tensors = [loss] + [p.grad for p in params if p.grad is not None] + [b for b in buffers if b.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
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

    def check_saveable(self, tensors: dict[str, torch.Tensor], *, step: int) -> None:
        """Refuse (NonFiniteLoss, on every process together) to save `tensors` when any holds NaN/inf: a file a run
        writes is always one the other commands accept."""
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if int(distributed.all_reduce_max(torch.tensor(int(bool(bad)), device=self.bad_step.device)).item()):
            names = ", ".join(sorted(bad)[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "") if bad else "held by another process"
            raise NonFiniteLoss(step, what=f"the model's tensors ({names})")

    def check(self) -> None:
        """Stop if any rank saw a non-finite loss; every rank calls this at the same steps, so all stop together."""
        bad = int(distributed.all_reduce_max(self.bad_step).item())
        if bad >= 0:
            raise NonFiniteLoss(bad)
