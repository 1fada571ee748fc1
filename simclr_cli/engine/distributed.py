"""Multi-process training: process group from the launcher's environment, gather with gradient, global BN, rank-0 logs.

Every function is a no-op with one process, so single-device code calls them unconditionally. Launch with
`torchrun` (or `srun` with MASTER_ADDR/MASTER_PORT exported); gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_cli.engine.device import resolve_device
from simclr_cli.engine.errors import ConfigError, SimCLRError

T = TypeVar("T")

LOGGER_NAME = "simclr"
MASTER_FIX = (
    "launch with torchrun (it sets them), or under SLURM export "
    'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) and MASTER_PORT=29500 before srun'
)


class RankFailed(SimCLRError):
    """Another rank stopped with an error; this one stops too instead of waiting for it."""


@dataclass(frozen=True)
class World:
    """This process's place among all training processes; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the device index on this node

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.world_size:
            raise ValueError(
                f"World(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}) is inconsistent; "
                "need world_size >= 1 and 0 <= rank, local_rank < world_size"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0


def from_environment(env: Mapping[str, str] | None = None) -> World:
    """The World torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) describes.

    torchrun's variables win (torchrun may run inside a SLURM job); SLURM counts only with more than one task;
    otherwise a single process.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _world(env, rank="RANK", world_size="WORLD_SIZE", local_rank="LOCAL_RANK", launcher="torchrun")
    if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        return _world(env, rank="SLURM_PROCID", world_size="SLURM_NTASKS", local_rank="SLURM_LOCALID", launcher="SLURM")
    return World()


def _world(env: Mapping[str, str], *, rank: str, world_size: str, local_rank: str, launcher: str) -> World:
    missing = [name for name in (rank, world_size, local_rank) if name not in env]
    if missing:
        raise ConfigError(
            f"{launcher} environment is incomplete: {', '.join(missing)} not set (need {rank}, {world_size} and "
            f"{local_rank} together); launch with torchrun, or unset the partial variables to run one process"
        )
    values = {name: _int(env, name) for name in (rank, world_size, local_rank)}
    size = values[world_size]
    if size < 1 or not 0 <= values[rank] < size or not 0 <= values[local_rank] < size:
        got = ", ".join(f"{name}={env[name]}" for name in (rank, world_size, local_rank))
        raise ConfigError(
            f"inconsistent {launcher} environment ({got}); need {world_size} >= 1 and 0 <= {rank}, {local_rank} < {world_size}"
        )
    return World(rank=values[rank], world_size=size, local_rank=values[local_rank])


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not a whole number; fix or unset it") from None


def launched_externally() -> bool:
    """True inside a torchrun/SLURM worker: the world is already set up and `--gpus` must not launch again."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has started this worker again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun started again after a failure: it should resume."""
    return restart_count() > 0


def local_processes() -> int:
    """The launcher's processes on this machine (torchrun's LOCAL_WORLD_SIZE), 1 without one."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Node:
    """This process's machine: which node it is, and this process's place among the node's processes."""

    index: int
    local_rank: int
    local_size: int


def node(world: World, env: Mapping[str, str] | None = None) -> Node:
    """The node `world`'s process runs on: torchrun's GROUP_RANK (or SLURM_NODEID, or ranks in blocks of
    LOCAL_WORLD_SIZE) and its local rank among LOCAL_WORLD_SIZE processes. Where the launcher does not say how many
    processes share the machine, each process counts as a node of its own: correct, only not shared."""
    env = os.environ if env is None else env
    size = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if world.world_size == 1 or not 0 <= world.local_rank < size:
        return Node(index=world.rank, local_rank=0, local_size=1)
    index = env.get("GROUP_RANK", env.get("SLURM_NODEID"))
    return Node(index=int(index) if index is not None else world.rank // size, local_rank=world.local_rank, local_size=size)


@contextlib.contextmanager
def context(*, device: str) -> Iterator[World]:
    """The process group the environment describes (none for one process), joined for the `with` block; every task
    runs inside one. Logging is filtered to rank 0."""
    world = from_environment()
    init(world, device_type=resolve_device(device).type)
    setup_logging_filter(world)
    try:
        yield world
    finally:
        shutdown()


def init(world: World, *, device_type: str, timeout_s: float = 1800) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when there are several processes; else nothing.

    Rendezvous reads MASTER_ADDR/MASTER_PORT; rank and world size come from `world`, so SLURM needs no RANK.
    """
    if world.world_size == 1:
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run one process or install a full PyTorch")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (world.rank, world.world_size):
            raise ConfigError(
                f"a process group is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"not rank {world.rank} of {world.world_size}; call distributed.shutdown() first"
            )
        return
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(
            f"multi-process training runs on cuda (nccl) or cpu (gloo), not {device_type}; pass --device cuda or cpu"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set, so the {world.world_size} processes cannot meet; {MASTER_FIX}")
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {world.local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(world.local_rank)  # before the group: nccl binds each rank to its current device
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method="env://",
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    """This process's rank in `group` (default: all processes); 0 without a process group."""
    return dist.get_rank(group) if _active(group) else 0


def world_size(group=None) -> int:
    """Number of processes in `group` (default: all processes); 1 without a process group."""
    return dist.get_world_size(group) if _active(group) else 1


def current_world() -> World:
    """The World of the active process group (the launcher's local rank when its environment describes this group,
    else 0); World() without a process group. For tasks the CLI runs after `init` without passing a World."""
    if not _active():
        return World()
    group_rank, size = dist.get_rank(), dist.get_world_size()
    try:
        launched = from_environment()
    except ConfigError:
        launched = World()
    if (launched.rank, launched.world_size) == (group_rank, size):
        return launched
    return World(rank=group_rank, world_size=size)


def shard(n: int, world: World, *, multiple_of: int = 1) -> range:
    """This rank's contiguous block of range(n): blocks in rank order, sizes differing by at most `multiple_of`.

    Boundaries fall on multiples of `multiple_of`: pass the batch size and every rank runs exactly the batches one
    process would, so the features match it bit for bit (kernels round differently for different batch shapes).
    """
    if n < 0:
        raise ValueError(f"cannot shard {n} rows; need n >= 0")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    blocks = -(-n // multiple_of)
    # The last `extra` ranks take one block more: the last of them also holds the one partial block, if any.
    base, extra = divmod(blocks, world.world_size)
    lighter = world.world_size - extra
    first = world.rank * base + max(0, world.rank - lighter)
    last = first + base + (world.rank >= lighter)
    return range(min(first * multiple_of, n), min(last * multiple_of, n))


GATHER_BLOCK_ROWS = 8192  # rows per rank and collective: bounds the device memory gather_rows needs


def gather_rows(x: Tensor, n_total: int, world: World) -> Tensor:
    """Every rank's contiguous block of rows (e.g. its `shard`), concatenated in rank order: the full (n_total, ...)
    tensor on every rank, on x's device, without padding; x itself with one process.

    Blocks may differ in size: each is padded to the largest for the all-gather and the padding dropped. The
    collective runs a block of rows at a time on the device the backend needs (the current CUDA device for nccl,
    the CPU for gloo), so a full CPU feature matrix never has to fit on the GPU.
    """
    if world.world_size == 1:
        if x.shape[0] != n_total:
            raise ValueError(f"gather_rows got {x.shape[0]} rows on one process, expected all {n_total}")
        return x
    wire = _wire()
    counts = [torch.zeros(1, dtype=torch.int64, device=wire) for _ in range(world.world_size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=wire))
    sizes = [int(c.item()) for c in counts]
    if sum(sizes) != n_total:
        raise ValueError(f"the ranks hold {sizes} rows ({sum(sizes)} in all), expected {n_total} in all")
    starts = [sum(sizes[:r]) for r in range(world.world_size)]
    out = x.new_empty((n_total, *x.shape[1:]))  # (n_total, ...)
    for offset in range(0, max(sizes), GATHER_BLOCK_ROWS):
        rows = min(GATHER_BLOCK_ROWS, max(sizes) - offset)
        block = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=wire)  # (rows, ...) padded
        mine = x[offset : offset + rows]
        block[: len(mine)] = mine.to(wire)
        parts = [torch.empty_like(block) for _ in range(world.world_size)]
        dist.all_gather(parts, block)
        for part, start, size in zip(parts, starts, sizes):
            take = max(0, min(rows, size - offset))
            out[start + offset : start + offset + take] = part[:take]
    return out


def _wire() -> torch.device:
    """Where a collective's tensors must be: the current CUDA device for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: a choice all must make together (a file one process cannot
    read is skipped by all, or the next collective would wait for a rank that skipped it); `flag` with one process."""
    if not _active():
        return flag
    return bool(all_reduce_max(torch.tensor(int(flag), device=_wire())).item())


def main_decides(flag: bool) -> bool:
    """Rank 0's `flag` on every rank: a choice only rank 0 can make (from files only it reads) that all must follow;
    `flag` with one process."""
    if not _active():
        return flag
    value = torch.tensor(int(flag), device=_wire())
    dist.broadcast(value, src=0)
    return bool(value.item())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends each rank the gradient of its own rows from EVERY rank's loss.

    Each rank's loss uses every rank's rows as keys, so the gradient of rank r's rows is the sum over ranks of
    the incoming gradients' slice r (official SimCLR: a differentiable cross-replica sum). Returning only the
    local slice of the local gradient, as several ports do, drops the other ranks' terms (SIMCLR.md, NT-Xent).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)  # (world_size * B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may share the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        first = dist.get_rank(ctx.group) * ctx.rows
        return grad[first : first + ctx.rows], None  # (B, ...)


def gather_with_grad(x: Tensor, *, group=None) -> Tensor:
    """Every rank's x (equal shapes) concatenated on dim 0 in rank order, differentiable; x itself with one process."""
    if not _active(group):
        return x
    return _GatherWithGrad.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients too: each rank's input feeds every rank's loss."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_mean(x: Tensor, *, group=None) -> Tensor:
    """The mean of x over ranks (detached, for logging a loss); x itself with one process."""
    if not _active(group):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x / dist.get_world_size(group)


def all_reduce_sum(x: Tensor) -> Tensor:
    """The elementwise sum of x over ranks (detached: SwAV's Sinkhorn sums over the global batch); x itself with one
    process."""
    if not _active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """The elementwise maximum over ranks (e.g. the first non-finite step any rank saw); x itself with one process."""
    if not _active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def on_main(world: World, work: Callable[[], T], *, device: torch.device) -> T | None:
    """Run `work` on rank 0 only (writing files); every rank learns whether it failed.

    Without this, an error on rank 0 would leave the others waiting at their next collective until the
    timeout; instead they stop at once with an error that points at rank 0's message.
    """
    return _together(lambda: work() if world.is_main else None, device=device, culprit="rank 0")


def on_every_rank(work: Callable[[], T], *, device: torch.device) -> T:
    """Run `work` on every rank, then wait for all; if any rank failed, every rank stops (that one with its error).

    Also a barrier: once it returns, every rank's work is done (e.g. its files are written).
    """
    return _together(work, device=device, culprit="another rank")


def _together(work: Callable[[], T], *, device: torch.device, culprit: str) -> T:
    """Run `work`, then tell every rank whether any failed: the failed one re-raises, the others raise RankFailed."""
    result, error = None, None
    try:
        result = work()
    except Exception as exc:  # re-raised below, after the other ranks have been told
        error = exc
    failed = all_reduce_max(torch.tensor(0 if error is None else 1, device=device))
    if error is not None:
        raise error
    if int(failed.item()):
        raise RankFailed(f"{culprit} stopped with an error (shown in its output); this process stopped with it")
    return result


def barrier() -> None:
    """Wait for every process (e.g. until rank 0 has written a file the others read)."""
    if _active():
        dist.barrier()


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover every rank's batch, for gloo on CPU (nn.SyncBatchNorm is GPU-only).

    Built from differentiable all-reduces, so autograd gives the gradient of the global-batch BN (SimCLR §2.2: local
    statistics let positives on one device leak through BN). Same parameters and buffers as nn.BatchNorm*d.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast a (C,) vector over x
        count = x.new_full((1,), x.numel() // x.shape[1])
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), None)  # (C + 1,): per-channel sums, then the count
        total = sums[-1]
        mean = sums[:-1] / total  # (C,)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), None) / total  # (C,) biased, as BN normalises with
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * total / (total - 1).clamp(min=1))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def sync_batchnorm(model: nn.Module, *, device_type: str) -> nn.Module:
    """BN statistics over all ranks' views: nn.SyncBatchNorm on CUDA, GlobalBatchNorm on CPU; unchanged with one process."""
    if not _active():
        return model
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_to_global(model)


def _convert_to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        # Every parameter and buffer below is the original's, so nothing is left on the wrong device.
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias  # None for the head's last BN (no shift)
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_to_global(child))
    return module


class MainOnly(logging.Filter):
    """Passes log records only on rank 0, so N processes print one log."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.is_main = world.is_main

    def filter(self, record: logging.LogRecord) -> bool:
        return self.is_main


def setup_logging_filter(world: World) -> MainOnly:
    """Attach (once) a MainOnly filter to the "simclr" logger; returns it so callers can remove it."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in [f for f in logger.filters if isinstance(f, MainOnly)]:
        logger.removeFilter(old)
    main_only = MainOnly(world)
    logger.addFilter(main_only)
    return main_only
