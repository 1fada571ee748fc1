"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two views of every image (§3, Appendix A), one encoder f and projection head g (§2.1), and NT-Xent with
temperature T over the 2N views of the global batch (eq. 1; every other view is a negative). No momentum
encoder, no queue, no extra checkpoint state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from simclr_cli.engine.device import Runtime
from simclr_cli.engine.loss import nt_xent, nt_xent_distributed
from simclr_cli.engine.methods.base import Crops, Method
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model


class SimCLRMethod(Method):
    name = "simclr"

    def __init__(self, model: ModelConfig, *, image_size: int, T: float, processes: int = 1) -> None:
        super().__init__(build_model(model))  # f and g: the modules trained and the network published
        self.image_size = image_size
        self.T = T  # temperature tau of NT-Xent (Table 5)
        self.processes = processes  # with several, each anchor meets the keys of every process (SIMCLR.md, Multi-GPU)

    @classmethod
    def from_config(cls, cfg, *, processes: int) -> SimCLRMethod:
        """From a resolved pretraining config: its model, view size and temperature."""
        return cls(cfg.model, image_size=cfg.augment.image_size, T=cfg.train.temperature, processes=processes)

    @property
    def network(self) -> SimCLR:
        return self.modules

    def crops(self) -> tuple[Crops, ...]:
        return (Crops(count=2, size=self.image_size),)

    def loss(self, net: Callable[[Tensor], tuple[Tensor, Tensor]], views: list[Tensor], *, rt: Runtime) -> Tensor:
        (x,) = views  # (2N, 3, S, S): views 1, then views 2, in one batch so BN sees all 2N (§2.2)
        with rt.autocast():
            _, z = net(x)  # (2N, proj_dim)
        z1, z2 = z.float().chunk(2)  # (N, proj_dim) each; the loss is computed in fp32
        loss_fn = nt_xent_distributed if self.processes > 1 else nt_xent
        return loss_fn(z1, z2, self.T)
