"""SwAV: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments".

Every image gives crops in groups by size (multi-crop, §3.2: 2 crops of 224 px from 14-100% of the image, 6 of
96 px from 5-14%). Each crop goes through the encoder f and head g to a unit-length feature z, scored against K
unit-length prototypes c_k (a bias-free Linear): z^T C. The codes q of the crops of the first group (the large
ones; the official crops_for_assign) come from the scores by Sinkhorn-Knopp (§3.1, eq. 3; Algorithm 1):
Q = exp(z^T C / epsilon)^T, scaled to sum to 1, then `sinkhorn_iterations` times each prototype's row to 1/K and
each sample's column to 1/B, over the GLOBAL batch (sums all-reduced, as the official `distributed_sinkhorn`).
The loss is the swapped prediction (eq. 1-2): each code q_s predicted from every other crop t,
-sum_k q_s,k log softmax(z_t^T C / T)_k at T = 0.1, averaged over the other crops, then over the codes.

Choices:
- The prototypes are L2-normalised after every update (the official code does it before every forward pass: the
  same matrices reach the loss) and get no update in the first `freeze_prototypes_epochs` epochs: their gradient is
  dropped before the update, as the official code does for its first 313 iterations (an ImageNet epoch at 4096).
- Each crop group goes through f on its own, so BN normalises each size over its own crops (the official
  multi-crop forward); g sees all crops at once.
- The queue (the paper's small-batch setting): the features z of the large crops of the last queue_length / B
  global batches, one queue per large crop, scored against the current prototypes and put before the batch in the
  Sinkhorn (only the batch's codes are used). Here it holds every process's features in rank order, the same on every rank, so
  one checkpoint holds it all; each rank scores an equal share of it, so the Sinkhorn over all ranks sees the
  whole queue once, as one process does (the official code keeps per rank its own features: the same columns).
  It fills from epoch `queue_after_epochs` on and is used once full, as the official epoch_queue_starts.
- At <= 64 px, unset settings resolve to two crops, temperature 0.5 and epsilon 0.02 (configs.SwAVConfig.with_sizes
  gives the measurements): with the paper's, the demo's 16 px digits collapsed to uniform codes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_cli.engine import distributed
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.methods.base import Crops, Method
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model


@torch.no_grad()
def sinkhorn(scores: Tensor, *, epsilon: float, iterations: int, processes: int = 1) -> Tensor:
    """The codes (m, K), rows summing to 1, of the m samples whose scores (m, K) this process holds, computed with
    every process's samples as one matrix of B = m * processes columns (each holds as many): §3.1, Algorithm 1."""
    reduce = distributed.all_reduce_sum if processes > 1 else (lambda x: x)
    scores = scores.float()
    # exp(1 / 0.05) fits float32, but a smaller epsilon would not: the largest score is subtracted first, a constant
    # factor of Q that the first normalisation removes.
    top = distributed.all_reduce_max(scores.max()) if processes > 1 else scores.max()
    Q = torch.exp((scores - top) / epsilon).T  # (K, m)
    K, B = Q.shape[0], Q.shape[1] * processes
    Q /= reduce(Q.sum())
    for _ in range(iterations):
        Q /= reduce(Q.sum(dim=1, keepdim=True))  # each prototype's share of the global batch ...
        Q /= K  # ... is 1/K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample's total ...
        Q /= B  # ... is 1/B
    return (Q * B).T  # (m, K): each sample's assignment sums to 1


def swapped_prediction(scores: Tensor, codes: Tensor, *, T: float) -> Tensor:
    """Eq. 1 over every pair: scores (V, n, K) of all V crops, codes (A, n, K) of the first A; for each code a and
    every other crop v, -mean_i sum_k codes[a, i, k] log softmax(scores[v, i] / T)_k, averaged over the V - 1 crops,
    then over the A codes (official main_swav.py). Computed in fp32."""
    log_p = F.log_softmax(scores.float() / T, dim=2)  # (V, n, K)
    V, A = scores.shape[0], codes.shape[0]
    loss = log_p.new_zeros(())
    for a in range(A):
        others = [v for v in range(V) if v != a]
        loss = loss - (codes[a] * log_p[others]).sum(dim=2).mean(dim=1).sum() / len(others)
    return loss / A


class WithPrototypes(nn.Module):
    """f and g (the network encoder.safetensors publishes) and the K prototypes: what the trainer places and saves."""

    def __init__(self, network: SimCLR, *, nmb_prototypes: int) -> None:
        super().__init__()
        self.network = network
        self.prototypes = nn.Linear(network.head.out_dim, nmb_prototypes, bias=False)  # (K, D): row k is c_k
        normalize(self.prototypes)

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """views[g] (count_g * n, 3, S_g, S_g), view-major -> z (V * n, D) unit rows and scores z^T C (V * n, K), the
        V crops in order (group by group)."""
        h = torch.cat([self.network.encoder(x) for x in views])  # (V * n, F): each size through f on its own
        z = F.normalize(self.network.head(h), dim=1)  # (V * n, D)
        return z, self.prototypes(z)


@torch.no_grad()
def normalize(prototypes: nn.Linear) -> None:
    """Each prototype c_k to unit length, in place (§3.1: C's columns are unit vectors)."""
    prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))


class SwAV(Method):
    name = "swav"

    def __init__(self, model: ModelConfig, *, crops: tuple[Crops, ...], nmb_prototypes: int, epsilon: float,
                 sinkhorn_iterations: int, temperature: float, queue_length: int = 0, queue_after_epochs: int = 0,
                 freeze_prototypes_epochs: int = 0, processes: int = 1) -> None:
        super().__init__(WithPrototypes(build_model(model), nmb_prototypes=nmb_prototypes))
        self.crop_groups = crops
        self.epsilon, self.sinkhorn_iterations, self.temperature = epsilon, sinkhorn_iterations, temperature
        self.queue_after_epochs, self.freeze_prototypes_epochs = queue_after_epochs, freeze_prototypes_epochs
        self.processes = processes  # with several, the Sinkhorn and the queue take every process's crops
        self.queue = torch.zeros(crops[0].count, queue_length, model.proj_dim)  # (A, L, D), one per large crop
        self.ptr = 0  # the slot the next global batch's features go to
        self.filled = 0  # slots written so far (at most L): the queue is used once they all are
        self.epoch = 0  # of the update in progress (before_update), for after_step
        self.features: Tensor | None = None  # the large crops' z of the global batch in progress, (A, B, D)

    @classmethod
    def from_config(cls, cfg, *, processes: int) -> SwAV:
        """From a resolved pretraining config: its model and `swav:` section (configs.SwAVConfig, prototypes and crop
        sizes resolved)."""
        swav = cfg.swav
        crops = tuple(Crops(count=count, size=size, scale=(low, high)) for count, size, low, high in
                      zip(swav.nmb_crops, swav.size_crops, swav.min_scale_crops, swav.max_scale_crops, strict=True))
        return cls(cfg.model, crops=crops, nmb_prototypes=swav.nmb_prototypes, epsilon=swav.epsilon,
                   sinkhorn_iterations=swav.sinkhorn_iterations, temperature=swav.temperature,
                   queue_length=swav.queue_length, queue_after_epochs=swav.queue_after_epochs,
                   freeze_prototypes_epochs=swav.freeze_prototypes_epochs, processes=processes)

    @property
    def network(self) -> SimCLR:
        return self.modules.network

    def crops(self) -> tuple[Crops, ...]:
        return self.crop_groups

    @property
    def queue_length(self) -> int:
        return self.queue.shape[1]

    def loss(self, net: Callable[[list[Tensor]], tuple[Tensor, Tensor]], views: list[Tensor], *, rt: Runtime) -> Tensor:
        A = self.crop_groups[0].count  # the crops that get codes
        n = views[0].shape[0] // A  # this process's images
        with rt.autocast():
            z, scores = net(views)  # (V * n, D), (V * n, K)
        scores = scores.float().view(-1, n, scores.shape[1])  # (V, n, K): crop-major
        with torch.no_grad():
            codes = torch.stack([self.codes(scores[a], a) for a in range(A)])  # (A, n, K); no gradient
            features = z.detach().float()[: A * n].view(A, n, -1)  # (A, n, D)
            if self.processes > 1:  # every rank's, in rank order
                features = torch.stack([distributed.gather_with_grad(f) for f in features])  # (A, B, D)
            self.features = features
        return swapped_prediction(scores, codes, T=self.temperature)

    def codes(self, scores: Tensor, a: int) -> Tensor:
        """The Sinkhorn codes (n, K) of large crop `a` from its scores (n, K); once the queue is full, this process's
        share of queue `a`, scored against the current prototypes, joins the batch's columns."""
        n = scores.shape[0]
        scores = scores.detach()
        if self.queue_length and self.filled == self.queue_length:
            self.queue = self.queue.to(scores.device)  # a no-op after the first use
            rank = distributed.rank() if self.processes > 1 else 0
            share = self.queue[a].tensor_split(self.processes)[rank]  # (L / W, D)
            scores = torch.cat([share @ self.modules.prototypes.weight.detach().float().T, scores])  # (L / W + n, K)
        return sinkhorn(scores, epsilon=self.epsilon, iterations=self.sinkhorn_iterations, processes=self.processes)[-n:]

    def before_update(self, *, step: int, epoch: int) -> None:
        """In the first freeze_prototypes_epochs epochs the prototypes' gradient is dropped: no update, no weight
        decay, no momentum (official main_swav.py); the epoch is kept for after_step."""
        self.epoch = epoch
        if epoch < self.freeze_prototypes_epochs:
            self.modules.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, *, step: int) -> None:
        """The prototypes back to unit length; from epoch queue_after_epochs on, the global batch's large-crop features
        into the queue."""
        normalize(self.modules.prototypes)
        if self.queue_length and self.epoch >= self.queue_after_epochs:
            self.enqueue(self.features)
        self.features = None

    def enqueue(self, features: Tensor) -> None:
        """Write features (A, B, D) at slots ptr, ptr+1, ... (mod L), overwriting the oldest; advance ptr by B."""
        self.queue = self.queue.to(features.device)
        batch = features.shape[1]
        slots = (self.ptr + torch.arange(batch, device=features.device)) % self.queue_length
        self.queue[:, slots] = features.to(self.queue.dtype)
        self.ptr = (self.ptr + batch) % self.queue_length
        self.filled = min(self.queue_length, self.filled + batch)

    def extra_state(self) -> dict[str, Tensor]:
        if not self.queue_length:
            return {}
        return {"queue": self.queue, "queue_ptr": torch.tensor(self.ptr, dtype=torch.int64),
                "queue_filled": torch.tensor(self.filled, dtype=torch.int64)}

    def load_extra_state(self, tensors: Mapping[str, Tensor]) -> None:
        if not self.queue_length:
            return
        ptr, filled = int(tensors["queue_ptr"]), int(tensors["queue_filled"])
        if not (0 <= ptr < self.queue_length and 0 <= filled <= self.queue_length):
            raise CheckpointError(f"the checkpoint's SwAV queue pointer {ptr} or fill {filled} is outside its queue of "
                                  f"{self.queue_length}; the file is damaged")
        self.queue, self.ptr, self.filled = tensors["queue"].clone(), ptr, filled
