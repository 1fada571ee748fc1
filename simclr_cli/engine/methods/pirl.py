"""PIRL: Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant Representations".

Two views of every image. The first, v_I, goes through the encoder and head f (the network that encoder.safetensors
publishes). The second is cut into a 3 x 3 jigsaw I^t: a random crop inside each cell of the grid (the Jigsaw gap:
64 px tiles in 85 px cells in the paper's code), the nine tiles in a random order, each through the same encoder and
a linear projection, the nine projections concatenated in that order and mapped by a second linear layer to one
vector g(v_{I^t}) (§3.2). A memory bank holds one unit vector m_I per image, an exponential moving average of f(v_I):
after every update m_I <- momentum m_I + (1 - momentum) f(v_I) for the global batch's images, then renormalised to
unit length as the official code does (its NCEAverage.update_memory; the paper states the average only).

The loss is eq. 5, L = lam L_NCE(m_I, g(v_{I^t})) + (1 - lam) L_NCE(m_I, f(v_I)), with eq. 4's noise-contrastive
L_NCE(m_I, q) = -log h(q, m_I) - sum_{I' in D_N} log(1 - h(q, m_I')) over N negatives m_I' drawn from the bank and
eq. 3's h(a, b) = P / (P + N/|D|), the probability that (a, b) came from the data rather than from the uniform noise
that drew the negatives, with P = exp(s(a, b)/T) / Z and s the cosine similarity. Eq. 3 writes exp(s/T) with Z = 1;
at T = 0.07 that puts h near 1 for every pair with s > -0.26, so the negatives' terms swamp the positive's. The
official code (after Wu et al. 2018, whose NCE the paper uses) divides by Z = |D| mean exp(s/T), estimated once from
the first step's jigsaw scores, so that P is about 1/|D| for a typical pair; so does this module, over the global
batch, keeping Z in the checkpoint.

Choices, each made so that 1 and N processes compute the same thing:
- The negatives: N bank rows drawn uniformly (with replacement, as NCE's noise) from (seed, step), so every process
  draws the same ones; one set serves the whole global batch (the official code draws N per image; one set makes the
  scores one product (n, D) x (D, N)). A negative that is the image itself is left out of its sum, as the paper's
  D_N excludes I. Left unset, N is the paper's 32,000, or on smaller data half the images.
- The bank takes every process's f(v_I) and image indices in rank order (all-gathers), which is one process's batch.
- BN: the tiles and the images go through the encoder as two batches (their sizes differ), each normalised over the
  global batch with train.sync_bn; the tiles first, so the running statistics move last towards whole images.
- The jigsaw's crops and order are a hash of (seed, epoch, image index), like the views': independent of the batch,
  the process count and the device. The tiles are cut from the second view after its augmentation, so they share its
  colour jitter (the official code jitters each tile on its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_cli.engine import distributed, seeds, views
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.methods.base import Crops, Method, StepImages
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model

GRID = 3  # a 3 x 3 jigsaw: 9 tiles
TILES = GRID * GRID
PAPER_CELL, PAPER_TILE = 85, 64  # the official code's Jigsaw: a 255 px crop in 85 px cells, a 64 px crop of each
JIGSAW_VIEW = 1 << 20  # the jigsaw's stream of views.uniforms, far from the crops' views 0, 1, ...


def tile_size(image_size: int) -> int:
    """The side of a tile cut from an `image_size` view: the paper's 64/85 of a grid cell."""
    return max(1, round(image_size // GRID * PAPER_TILE / PAPER_CELL))


@dataclass(frozen=True)
class Jigsaw:
    """Where each of a batch's tiles is cut: position p of image b holds a tile x tile crop of grid cell cells[b, p]
    (row-major, 0..8) whose top-left pixel is (tops[b, p], lefts[b, p])."""

    cells: Tensor  # (B, 9) int64: each image's permutation of the cells
    tops: Tensor  # (B, 9) int64
    lefts: Tensor  # (B, 9) int64
    tile: int


def draw_jigsaw(*, seed: int, epoch: int, indices: np.ndarray, image_size: int) -> Jigsaw:
    """The random jigsaw of each image, a pure function of (seed, epoch, image index)."""
    u = views.uniforms(seed=seed, epoch=epoch, indices=indices, view=JIGSAW_VIEW, n=3 * TILES)  # (B, 27)
    cell, tile = image_size // GRID, tile_size(image_size)
    cells = np.argsort(u[:, :TILES], axis=1, kind="stable")  # (B, 9): a uniformly random permutation
    slack = cell - tile + 1  # the tile's possible offsets inside its cell, per axis
    tops = cells // GRID * cell + np.floor(u[:, TILES : 2 * TILES] * slack).astype(np.int64)
    lefts = cells % GRID * cell + np.floor(u[:, 2 * TILES :] * slack).astype(np.int64)
    return Jigsaw(torch.from_numpy(cells), torch.from_numpy(tops), torch.from_numpy(lefts), tile)


def cut(x: Tensor, jigsaw: Jigsaw) -> Tensor:
    """(B, C, S, S) views -> (9B, C, t, t) tiles: image b's at rows 9b .. 9b + 8, in its jigsaw's order."""
    b, c, t = x.shape[0], x.shape[1], jigsaw.tile
    span = torch.arange(t, device=x.device)
    rows = jigsaw.tops.to(x.device)[:, :, None] + span  # (B, 9, t)
    cols = jigsaw.lefts.to(x.device)[:, :, None] + span  # (B, 9, t)
    image = torch.arange(b, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    tiles = x.permute(0, 2, 3, 1)[image, rows[:, :, :, None], cols[:, :, None, :]]  # (B, 9, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3).reshape(b * TILES, c, t, t)


def nce(q: Tensor, positives: Tensor, negatives: Tensor, *, own: Tensor, T: float, log_Z: float,
        noise: float) -> Tensor:
    """Eq. 4 against the bank, the mean over the rows of q: -log h(q_i, m_i) - sum_j log(1 - h(q_i, m_j)), where
    h = P / (P + noise), P = exp(q.m / T) / Z and noise = N/|D|. q (n, D), positives (n, D) and negatives (N, D) are
    unit rows; own (n, N) marks the negatives that are row i's own image, left out. Computed in fp32, outside autocast,
    as logistic terms: -log h = softplus(log noise - log P), -log(1 - h) = softplus(log P - log noise)."""
    with torch.autocast(q.device.type, enabled=False):
        q, positives, negatives = q.float(), positives.float(), negatives.float()
        log_noise = math.log(noise)
        log_p_positive = (q * positives).sum(dim=1) / T - log_Z  # (n,)
        log_p_negative = q @ negatives.T / T - log_Z  # (n, N)
        negative_terms = F.softplus(log_p_negative - log_noise).masked_fill(own, 0.0)
        return (F.softplus(log_noise - log_p_positive) + negative_terms.sum(dim=1)).mean()


@torch.no_grad()
def bank_update(bank: Tensor, indices: Tensor, f: Tensor, *, momentum: float) -> None:
    """m_I <- momentum m_I + (1 - momentum) f(v_I), then unit length, for the rows `indices` (B,) of bank (|D|, D)."""
    bank[indices] = F.normalize(momentum * bank[indices] + (1 - momentum) * f.to(bank.dtype), dim=1)


class PIRLNetwork(nn.Module):
    """The shared encoder with its two heads: f (the network's own head, for whole images) and g (a linear projection
    of each tile, then a linear map of the nine concatenated), as in the paper's ResNet-50 (2048 -> 128 per tile,
    1152 -> 128)."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.network = build_model(model)
        self.tile_head = nn.Linear(self.network.encoder.out_dim, model.proj_dim)
        self.jigsaw_head = nn.Linear(TILES * model.proj_dim, model.proj_dim)

    def forward(self, images: Tensor, tiles: Tensor) -> tuple[Tensor, Tensor]:
        """images (n, 3, S, S) and tiles (9n, 3, t, t) -> f(v_I) and g(v_{I^t}), (n, proj_dim) each, not normalised."""
        h = self.network.encoder(tiles)  # (9n, out_dim)
        g = self.jigsaw_head(self.tile_head(h).reshape(images.shape[0], -1))  # (n, 9 proj_dim) -> (n, proj_dim)
        _, f = self.network(images)  # (n, proj_dim)
        return f, g


class PIRL(Method):
    name = "pirl"

    def __init__(self, model: ModelConfig, *, image_size: int, bank_size: int, negatives: int, momentum: float,
                 T: float, lam: float, seed: int = 0, processes: int = 1) -> None:
        super().__init__(PIRLNetwork(model))
        self.image_size, self.N, self.momentum, self.T, self.lam = image_size, negatives, momentum, T, lam
        self.seed = seed  # the jigsaws and the negatives are drawn from it
        self.processes = processes  # with several, the bank takes every process's rows
        # Random unit rows to start with, as the official code's; drawn from the run's seed, so every rank's match.
        self.bank = F.normalize(torch.rand(bank_size, model.proj_dim) - 0.5, dim=1)  # (|D|, D)
        self.Z: float | None = None  # the partition function, estimated at the first step
        self.images: StepImages | None = None  # the step in progress
        self.update: tuple[Tensor, Tensor] | None = None  # its global indices and f(v_I), for the bank after the update

    @classmethod
    def from_config(cls, cfg, *, processes: int) -> PIRL:
        """From a resolved pretraining config: its model, view size, seed and `pirl:` section (configs.PIRLConfig,
        negatives and bank_size resolved)."""
        pirl = cfg.pirl
        return cls(cfg.model, image_size=cfg.augment.image_size, bank_size=pirl.bank_size, negatives=pirl.negatives,
                   momentum=pirl.momentum, T=pirl.T, lam=pirl.lam, seed=cfg.train.seed, processes=processes)

    @property
    def network(self) -> SimCLR:
        return self.modules.network

    def crops(self) -> tuple[Crops, ...]:
        return (Crops(count=2, size=self.image_size),)  # v_I, and the view the jigsaw is cut from

    def begin_step(self, images: StepImages) -> None:
        self.images = images

    def negative_indices(self, step: int) -> Tensor:
        """The N bank rows step `step` (0-based) contrasts with: uniform draws, the same on every process."""
        generator = torch.Generator().manual_seed(seeds.mix(self.seed, step))
        return torch.randint(self.bank.shape[0], (self.N,), generator=generator)  # (N,)

    def loss(self, net: Callable[[Tensor], tuple[Tensor, Tensor]], views: list[Tensor], *, rt: Runtime) -> Tensor:
        (x,) = views  # (2n, 3, S, S): the images' views, then the views the jigsaws are cut from
        images = self.images
        x_image, x_jigsaw = x.chunk(2)
        jigsaw = draw_jigsaw(seed=self.seed, epoch=images.epoch, indices=images.indices.numpy(), image_size=self.image_size)
        tiles = cut(x_jigsaw, jigsaw)  # (9n, 3, t, t)
        tiles = tiles.contiguous(memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
        with rt.autocast():
            f, g = net(x_image, tiles)  # (n, D) each
        f, g = F.normalize(f.float(), dim=1), F.normalize(g.float(), dim=1)
        self.bank = self.bank.to(f.device)  # a no-op after the first step
        mine = images.indices.to(f.device)  # (n,)
        drawn = self.negative_indices(images.step).to(f.device)  # (N,)
        positives, negatives = self.bank[mine], self.bank[drawn]  # (n, D), (N, D)
        if self.Z is None:
            self.Z = self.estimate_Z(g.detach(), positives, negatives)
        own = mine[:, None] == drawn[None, :]  # (n, N)
        noise = self.N / self.bank.shape[0]
        terms = [nce(q, positives, negatives, own=own, T=self.T, log_Z=math.log(self.Z), noise=noise) for q in (g, f)]
        with torch.no_grad():  # the gathers only collect every rank's rows, in rank order
            everyone = distributed.gather_with_grad(mine) if self.processes > 1 else mine  # (N_batch,)
            f_all = distributed.gather_with_grad(f.detach()) if self.processes > 1 else f.detach()  # (N_batch, D)
        self.update = (everyone, f_all)
        return self.lam * terms[0] + (1 - self.lam) * terms[1]

    @torch.no_grad()
    def estimate_Z(self, g: Tensor, positives: Tensor, negatives: Tensor) -> float:
        """Z = |D| mean exp(s/T) over the global batch's jigsaw scores, positives and negatives (the official
        code's partition function, fixed from its first batch)."""
        scores = torch.cat([(g * positives).sum(dim=1, keepdim=True), g @ negatives.T], dim=1).double() / self.T
        mean = distributed.all_reduce_mean(torch.exp(scores).mean())  # equal shapes: the mean of the means
        return self.bank.shape[0] * float(mean)

    @torch.no_grad()
    def after_step(self, *, step: int) -> None:
        """The global batch's f(v_I) into the bank."""
        indices, f = self.update
        bank_update(self.bank, indices, f, momentum=self.momentum)
        self.update = None

    def extra_state(self) -> dict[str, Tensor]:
        Z = 0.0 if self.Z is None else self.Z  # 0: not estimated yet (a stop before the first step)
        return {"bank": self.bank, "Z": torch.tensor(Z, dtype=torch.float64)}

    def load_extra_state(self, tensors: Mapping[str, Tensor]) -> None:
        if tuple(tensors["bank"].shape) != tuple(self.bank.shape):
            raise CheckpointError(f"the checkpoint's PIRL memory bank is {tuple(tensors['bank'].shape)}, not "
                                  f"{tuple(self.bank.shape)} (one row per image); the file is damaged")
        Z = float(tensors["Z"])
        if Z < 0:
            raise CheckpointError(f"the checkpoint's PIRL partition function Z is {Z}, below 0; the file is damaged")
        self.bank, self.Z = tensors["bank"].clone(), Z or None

