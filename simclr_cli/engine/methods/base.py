"""The seam between the trainer and a pretraining method.

A method says five things: which views it needs (`crops`, groups of views by size and crop scale), which modules
it trains (`modules`, of which `network` is the encoder-and-head that encoder.safetensors publishes), its `loss` on
a batch of views, what it does `after_step` (a momentum update, a queue push; `before_update` runs between the
backward pass and the update), and what `extra_state` its checkpoint carries beyond the modules' own state dicts.
The trainer owns everything else: devices, process groups, the optimiser, the schedule, checkpoints, signals,
logging. A method never touches a device, a file or a process group itself.

A method that keeps per-image state (PIRL's memory bank) or draws randomness of its own also reads `begin_step`:
the trainer tells it, before each `loss`, which images the step's views show (`StepImages`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from simclr_cli.engine.device import Runtime
from simclr_cli.engine.model import SimCLR
from simclr_cli.engine.views import Crops  # a group of views: count, size and crop scale (the view code makes them)

__all__ = ["Crops", "Method", "StepImages"]


@dataclass(frozen=True)
class StepImages:
    """The images behind a step's views, given to `Method.begin_step` before the step's `loss`."""

    indices: Tensor  # (n,) int64 on the CPU: this process's images' dataset indices, in the order of its views' rows
    epoch: int  # 0-based: the epoch the views are drawn from
    step: int  # 0-based: the step being taken (`after_step` then gets step + 1)
    # The GLOBAL batch is every process's `indices` concatenated in rank order (EpochSampler's chunks), the one
    # process's batch: a method that needs it gathers them (distributed.gather_with_grad), so the others pay no
    # collective for it.


class Method:
    """Base of every pretraining method; see the module docstring for the five things a subclass defines."""

    name: ClassVar[str]

    def __init__(self, modules: nn.Module) -> None:
        # Everything trained or updated, as one module: the trainer places it on the device, converts its BN for
        # several processes, wraps it for DDP, checkpoints its state dict and optimises its parameters.
        self.modules = modules

    @classmethod
    def from_config(cls, cfg, *, processes: int) -> Method:
        """The method for a resolved pretraining config (configs.PretrainConfig), run by `processes` processes."""
        raise NotImplementedError

    @property
    def network(self) -> SimCLR:
        """The encoder f and head g written to encoder.safetensors, evaluated and monitored."""
        raise NotImplementedError

    def crops(self) -> tuple[Crops, ...]:
        """The views each image gives per step, grouped by size; `loss` receives one tensor per group."""
        raise NotImplementedError

    def loss(self, net: Callable[[Tensor], tuple[Tensor, Tensor]], views: list[Tensor], *, rt: Runtime) -> Tensor:
        """The training loss of one batch. `net` is `modules` as the trainer wraps it (DDP, compiled): forward through
        it, not through `modules`, so gradients are averaged over processes. `views[g]` is (count * N, 3, S, S) for
        crop group g, view-major (all first views, then all second views, ...)."""
        raise NotImplementedError

    def begin_step(self, images: StepImages) -> None:
        """Called before every step's `loss` with the images its views show; nothing by default."""

    def after_init(self) -> None:
        """Called once `network` holds weights loaded from elsewhere (train.init), before the first step; a momentum
        copy of it starts from them here. Nothing by default."""

    def before_update(self, *, step: int, epoch: int) -> None:
        """Called between the backward pass and the optimiser update that will be applied (1-based `step`, 0-based
        `epoch`, the one the data and views are drawn from): the place to drop a gradient (SwAV freezes its
        prototypes in the first epoch) or to note the epoch for `after_step`. Nothing by default."""

    def after_step(self, *, step: int) -> None:
        """Called after every optimiser update that was applied (1-based `step`); nothing by default."""

    def extra_state(self) -> dict[str, Tensor]:
        """Tensors the checkpoint carries beyond `modules.state_dict()`; none by default."""
        return {}

    def load_extra_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore what `extra_state` returned (already checked to hold the same names)."""
