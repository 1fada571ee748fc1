"""MoCo v1 and v2: He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning", and Chen et
al. 2020, "Improved Baselines with Momentum Contrastive Learning".

Two views of every image: the query view through the query encoder f_q (encoder and head: the network that
encoder.safetensors publishes), the key view through the key encoder f_k, a copy of f_q that gets no gradients and
follows it by momentum after every update, theta_k <- m theta_k + (1 - m) theta_q (eq. 2, m = 0.999). The loss is
InfoNCE (eq. 1) of each unit-length query q against its own key k+ and the K keys of a queue:
L_q = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_i exp(q.k_i / T)). After the update the global batch's keys are
enqueued and the oldest dropped. v1 and v2 differ in T (0.07 and 0.2); their presets add the rest of each paper's
recipe (v1: a linear head; v2: an MLP head, blur, a cosine schedule).

Choices, each made so that 1 and N processes compute the same thing:
- BN: global BN, not shuffle-BN. With train.sync_bn (on by default) both encoders normalise over the global batch,
  as MoCo v3 and many reimplementations do. Shuffle-BN exists because per-GPU BN over 32 images lets a query and
  its key share batch statistics that the queue's older keys lack, a shortcut the model learns; shuffling the keys
  across GPUs breaks it. Its statistics depend on how the batch is split, so one process cannot reproduce N;
  statistics over the whole global batch (256 in the papers) vary far less from batch to batch and are the same
  for any split. On small batches the shortcut may return: a loss falling much faster than kNN accuracy rises is
  its sign.
- The queue holds the keys of ALL processes in rank order (an all-gather), which is one process's order.
- K need not be a multiple of the global batch B: the official code asserts it is; here the keys wrap round the
  end of the queue (slots ptr, ptr+1, ... mod K), which is the official behaviour whenever B divides K. K must be
  at least B (each step writes B keys) and below the number of images, or a query's own earlier key would be one
  of its negatives. Left unset, K is the papers' 65,536, or on smaller data the largest multiple of B at most half
  the images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_cli.engine import distributed
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.methods.base import Crops, Method
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model

def info_nce(q: Tensor, k: Tensor, queue: Tensor, T: float) -> Tensor:
    """MoCo's InfoNCE (eq. 1), the mean over the queries: q (n, D) and k (n, D) unit rows, row i of k the positive
    of row i of q; queue (K, D) unit rows, every one a negative of every query. Computed in fp32, outside autocast."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        positive = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
        negatives = q @ queue.T  # (n, K)
        logits = torch.cat([positive, negatives], dim=1) / T  # (n, 1 + K): the positive is class 0
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class QueryAndKey(nn.Module):
    """f_q and its momentum copy f_k: everything the trainer places, converts for several processes and saves. The
    copy takes no gradients, so DDP averages f_q's alone and the optimiser never sees f_k."""

    def __init__(self, query: SimCLR) -> None:
        super().__init__()
        self.query = query
        self.key = copy.deepcopy(query).requires_grad_(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (2n, 3, S, S): the query views, then the key views; returns q and k (n, proj_dim), not normalised."""
        x_q, x_k = x.chunk(2)
        _, q = self.query(x_q)
        with torch.no_grad():
            _, k = self.key(x_k)
        return q, k


class MoCo(Method):
    """MoCo on the Method seam; `MoCoV1` and `MoCoV2` name the two versions (they differ in config defaults only)."""

    def __init__(self, model: ModelConfig, *, image_size: int, K: int, m: float, T: float, processes: int = 1) -> None:
        super().__init__(QueryAndKey(build_model(model)))
        self.image_size, self.K, self.m, self.T = image_size, K, m, T
        self.processes = processes  # with several, the queue takes every process's keys
        # Random unit keys to start with, as the official code's; drawn from the run's seed, so every rank's match.
        self.queue = F.normalize(torch.randn(K, model.proj_dim), dim=1)  # (K, D)
        self.ptr = 0  # the slot the next key goes to
        self.keys: Tensor | None = None  # the global batch's keys of the step in progress, enqueued after its update

    @classmethod
    def from_config(cls, cfg, *, processes: int) -> MoCo:
        """From a resolved pretraining config: its model, view size and `moco:` section (configs.MoCoConfig, K and T
        resolved)."""
        moco = cfg.moco
        return cls(cfg.model, image_size=cfg.augment.image_size, K=moco.K, m=moco.m, T=moco.T, processes=processes)

    @property
    def network(self) -> SimCLR:
        return self.modules.query

    def crops(self) -> tuple[Crops, ...]:
        return (Crops(count=2, size=self.image_size),)

    def after_init(self) -> None:
        self.copy_query_to_key()

    @torch.no_grad()
    def copy_query_to_key(self) -> None:
        """f_k = f_q, parameters and BN statistics (the official code's start)."""
        self.modules.key.load_state_dict(self.modules.query.state_dict())

    def loss(self, net: Callable[[Tensor], tuple[Tensor, Tensor]], views: list[Tensor], *, rt: Runtime) -> Tensor:
        (x,) = views  # (2n, 3, S, S): query views, then key views
        with rt.autocast():
            q, k = net(x)  # (n, D) each
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        self.keys = k.detach()  # (n, D); k has no gradient
        if self.processes > 1:
            with torch.no_grad():  # the gather only collects every rank's keys, in rank order
                self.keys = distributed.gather_with_grad(self.keys)  # (N, D)
        self.queue = self.queue.to(q.device)  # a no-op after the first step
        return info_nce(q, k, self.queue, self.T)

    @torch.no_grad()
    def after_step(self, *, step: int) -> None:
        """The momentum update of f_k (eq. 2), then the global batch's keys into the queue."""
        momentum_update(self.modules.key, self.modules.query, m=self.m)
        self.enqueue(self.keys)
        self.keys = None

    def enqueue(self, keys: Tensor) -> None:
        """Write keys (B, D) at slots ptr, ptr+1, ... (mod K), overwriting the oldest; advance ptr by B."""
        slots = (self.ptr + torch.arange(keys.shape[0], device=self.queue.device)) % self.K
        self.queue[slots] = keys.to(self.queue.dtype)
        self.ptr = (self.ptr + keys.shape[0]) % self.K

    def extra_state(self) -> dict[str, Tensor]:
        return {"queue": self.queue, "queue_ptr": torch.tensor(self.ptr, dtype=torch.int64)}

    def load_extra_state(self, tensors: Mapping[str, Tensor]) -> None:
        ptr = int(tensors["queue_ptr"])
        if not 0 <= ptr < self.K:
            raise CheckpointError(f"the checkpoint's MoCo queue pointer {ptr} is outside its queue of {self.K}; the file is damaged")
        self.queue, self.ptr = tensors["queue"].clone(), ptr


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, *, m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter (eq. 2); BN statistics are each encoder's own."""
    for k, q in zip(key.parameters(), query.parameters(), strict=True):
        k.mul_(m).add_(q.detach(), alpha=1 - m)


class MoCoV1(MoCo):
    name = "moco-v1"  # configs.MOCO_METHODS names both: the methods whose settings are its `moco:` section


class MoCoV2(MoCo):
    name = "moco-v2"
