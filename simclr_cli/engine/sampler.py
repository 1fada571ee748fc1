"""The epoch sampler: whole global batches in a seeded order, each process taking its rank's chunk."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from simclr_cli.engine import seeds


class EpochSampler(Sampler):
    """Yields dataset indices: a (seed, epoch)-seeded permutation in whole global batches, this rank's chunk of each.

    The ranks' chunks concatenated in rank order are exactly the one-process batch, so the batches do not
    depend on the number of processes; `start_batch` skips the epoch's first global batches (resume mid-epoch).
    """

    def __init__(self, num_samples: int, *, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}; need 0 <= rank < world_size")
        if global_batch_size < 1 or global_batch_size % world_size != 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the number of processes "
                f"({world_size}); change the batch size or the process count"
            )
        if global_batch_size > num_samples:
            raise ValueError(
                f"global_batch_size {global_batch_size} is larger than the dataset ({num_samples} images); "
                "use a smaller batch size or more data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch; the incomplete last batch is dropped (NT-Xent wants full batches)."""
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch} (batches per epoch)")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(seeds.mix(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        lo = self.rank * self.local_batch_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch_size + lo
            yield from order[first : first + self.local_batch_size]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch_size
