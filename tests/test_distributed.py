"""distributed: environment parsing, one-process no-ops, and 2-process gloo runs checked against one process.

Multi-process tests run on 2 spawned CPU processes (tests/multiprocess.py). Each worker computes the one-process
reference itself from the same seed and asserts inside the worker.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multiprocess import run_on_two_processes
from simclr_cli.engine import distributed
from simclr_cli.engine.distributed import GlobalBatchNorm, MainOnly, World
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.loss import nt_xent, nt_xent_distributed

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                    "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------------------------
# gathered loss: value and gradients equal the one-process loss on the global batch


def _gather_without_remote_grad(x: torch.Tensor, *, group=None) -> torch.Tensor:
    """The classic bug: other ranks' rows are constants, so each rank's keys get only its own loss's gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _loss_worker(world: World) -> None:
    # Gradient factor. L = nt_xent(global batch) = (1/2N) sum over all anchors = (1/W) sum_r loss_r, where loss_r is
    # rank r's nt_xent_distributed (mean over its 2n anchors, 2N = 2nW). gather_with_grad's backward sums every rank's
    # key gradients, so rank r's input gradient is d(sum_s loss_s)/dz_r = W * dL/dz_r. DDP divides parameter
    # gradients by W, giving exactly dL/dtheta; for the inputs: grad_r / W == the full-batch gradient's slice r.
    for images, dim, temperature in ((8, 5, 0.5), (2, 3, 0.1), (6, 16, 0.05)):  # (2, 3): one image per rank
        generator = torch.Generator().manual_seed(images * 10 + dim)
        full1 = torch.randn(images, dim, generator=generator)
        full2 = torch.randn(images, dim, generator=generator)
        n = images // world.world_size
        mine = slice(world.rank * n, (world.rank + 1) * n)

        ref1, ref2 = full1.clone().requires_grad_(), full2.clone().requires_grad_()
        reference = nt_xent(ref1, ref2, temperature)  # one process, the whole global batch
        reference.backward()

        z1, z2 = full1[mine].clone().requires_grad_(), full2[mine].clone().requires_grad_()
        loss = nt_xent_distributed(z1, z2, temperature)
        loss.backward()
        torch.testing.assert_close(distributed.all_reduce_mean(loss), reference.detach(), rtol=0, atol=1e-6)
        for got, want in ((z1.grad, ref1.grad[mine]), (z2.grad, ref2.grad[mine])):
            torch.testing.assert_close(got / world.world_size, want, rtol=0, atol=1e-6)

        # The same loss with the buggy gather: equal value, different gradients, so the check above has teeth.
        b1, b2 = full1[mine].clone().requires_grad_(), full2[mine].clone().requires_grad_()
        real_gather = distributed.gather_with_grad
        distributed.gather_with_grad = _gather_without_remote_grad
        try:
            buggy = nt_xent_distributed(b1, b2, temperature)
        finally:
            distributed.gather_with_grad = real_gather
        buggy.backward()
        torch.testing.assert_close(buggy, loss)
        error = max((b1.grad / world.world_size - ref1.grad[mine]).abs().max().item(),
                    (b2.grad / world.world_size - ref2.grad[mine]).abs().max().item())
        assert error > 1e-3, f"the buggy gather matched the one-process gradients (max error {error})"


def test_gathered_loss_and_gradients_equal_the_global_batch_loss():
    run_on_two_processes(_loss_worker)


# ---------------------------------------------------------------------------------------------------------------
# a full training step: global BN + DDP on 2 ranks == one process on the global batch


def _tiny_model() -> nn.Module:
    from simclr_cli.engine.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=0.25, head_output_bn=True).resolved(image_size=16))
    # Random BN affines, so no residual branch is switched off by the zero-init gammas and every weight moves.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data = 0.5 + torch.rand(module.weight.shape, generator=generator)
            if module.bias is not None:
                module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
    return model


def _train_step(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor, *, loss_fn, steps: int = 2) -> None:
    from simclr_cli.engine.optim import OptimConfig, build_optimizer

    optimizer = build_optimizer(model, OptimConfig(name="lars", weight_decay=1e-4).resolved(image_size=224), lr=0.1)
    model.train()
    for _ in range(steps):
        # Both views on the batch axis, as one process does (SimCLR §2.2): BN statistics cover all views.
        _, z = model(torch.cat([view1, view2]))  # (2n, proj_dim)
        z1, z2 = z.chunk(2)  # (n, proj_dim) each
        optimizer.zero_grad(set_to_none=True)
        loss_fn(z1, z2, 0.5).backward()
        optimizer.step()


def _max_difference(model: nn.Module, reference: nn.Module) -> float:
    mine, ref = model.state_dict(), reference.state_dict()
    assert mine.keys() == ref.keys()
    return max((mine[k].double() - ref[k].double()).abs().max().item() for k in ref)


def _step_worker(world: World) -> None:
    images = 8
    generator = torch.Generator().manual_seed(2)
    view1 = torch.randn(images, 3, 16, 16, generator=generator)  # (N, 3, S, S) the global batch, first views
    view2 = torch.randn(images, 3, 16, 16, generator=generator)
    n = images // world.world_size
    mine = slice(world.rank * n, (world.rank + 1) * n)  # EpochSampler's chunk for this rank

    reference = _tiny_model()  # one process, plain BN, the whole global batch
    _train_step(reference, view1, view2, loss_fn=nt_xent)

    model = distributed.sync_batchnorm(_tiny_model(), device_type="cpu")
    assert any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    _train_step(DistributedDataParallel(model), view1[mine], view2[mine], loss_fn=nt_xent_distributed)
    for key, value in model.state_dict().items():  # parameters AND running statistics
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=1e-5, msg=key)

    # Per-rank BN (no sync) is a different computation: the comparison above can fail.
    local_bn = _tiny_model()
    _train_step(DistributedDataParallel(local_bn), view1[mine], view2[mine], loss_fn=nt_xent_distributed)
    assert _max_difference(local_bn, reference) > 1e-4

    # On CUDA the conversion is PyTorch's own SyncBatchNorm (converted here, not run: it has no CPU kernels).
    on_gpu = distributed.sync_batchnorm(_tiny_model(), device_type="cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in on_gpu.modules())
    assert on_gpu.head.layers[-1].bn.bias is None  # the head's output BN keeps "no shift" through conversion


def test_global_bn_ddp_step_on_two_ranks_equals_one_process_on_the_global_batch():
    run_on_two_processes(_step_worker)


# ---------------------------------------------------------------------------------------------------------------
# sharding rows and gathering them back (feature extraction on N processes)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 16, 101])
@pytest.mark.parametrize("multiple_of", [1, 3, 4])
def test_shards_are_contiguous_disjoint_balanced_and_cover_in_rank_order(n, world_size, multiple_of):
    shards = [distributed.shard(n, World(rank=r, world_size=world_size), multiple_of=multiple_of)
              for r in range(world_size)]
    assert all(s.step == 1 for s in shards)  # contiguous
    assert [i for s in shards for i in s] == list(range(n))  # disjoint, covering, in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= multiple_of  # balanced (within one row when multiple_of=1)
    assert all(s.start % multiple_of == 0 for s in shards if len(s))  # cut at whole batches
    if multiple_of == 1:
        assert sizes == sorted(sizes)  # the larger shards last
        assert sizes == [n // world_size + (r >= world_size - n % world_size) for r in range(world_size)]


def test_shard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n >= 0"):
        distributed.shard(-1, World())
    with pytest.raises(ValueError, match="multiple_of"):
        distributed.shard(4, World(), multiple_of=0)


def test_gather_rows_is_the_identity_with_one_process():
    x = torch.randn(5, 3)
    assert distributed.gather_rows(x, 5, World()) is x
    with pytest.raises(ValueError, match="expected all 7"):
        distributed.gather_rows(x, 7, World())
    assert distributed.current_world() == World()


def _gather_rows_worker(world: World) -> None:
    assert distributed.current_world() == world  # the launcher's environment describes this group
    for n, dim, multiple_of in ((5, 3, 1), (1, 2, 1), (0, 4, 1), (9, 2, 4)):  # uneven, an empty rank, no rows
        full = torch.arange(n * dim, dtype=torch.float32).reshape(n, dim)  # (n, dim)
        mine = distributed.shard(n, world, multiple_of=multiple_of)
        gathered = distributed.gather_rows(full[mine.start : mine.stop].clone(), n, world)
        assert gathered.shape == (n, dim) and torch.equal(gathered, full), (n, multiple_of)
    # Blocks larger than one collective go through in several, padding dropped each time.
    original, distributed.GATHER_BLOCK_ROWS = distributed.GATHER_BLOCK_ROWS, 2
    try:
        full = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        mine = distributed.shard(7, world)
        assert torch.equal(distributed.gather_rows(full[mine.start : mine.stop], 7, world), full)
    finally:
        distributed.GATHER_BLOCK_ROWS = original
    with pytest.raises(ValueError, match="expected 6 in all"):
        distributed.gather_rows(torch.zeros(len(distributed.shard(5, world)), 2), 6, world)
    # Choices all ranks make together: any rank's flag, or rank 0's.
    assert distributed.any_rank(world.rank == 1) and not distributed.any_rank(False)
    assert distributed.main_decides(world.rank == 0) and not distributed.main_decides(world.rank == 1)
    # on_every_rank: results stay local; one rank's failure stops every rank.
    assert distributed.on_every_rank(lambda: world.rank * 10, device=torch.device("cpu")) == world.rank * 10

    def fail_on_rank_1() -> None:
        if world.rank == 1:
            raise KeyError("rank 1's own error")

    expected = KeyError if world.rank == 1 else distributed.RankFailed
    with pytest.raises(expected):
        distributed.on_every_rank(fail_on_rank_1, device=torch.device("cpu"))


def test_gather_rows_and_on_every_rank_on_two_ranks():
    run_on_two_processes(_gather_rows_worker, timeout_s=120)


# ---------------------------------------------------------------------------------------------------------------
# environment parsing


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_means_one_process(clean_env):
    world = distributed.from_environment()
    assert world == World(rank=0, world_size=1, local_rank=0) and world.is_main


def test_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    world = distributed.from_environment()
    assert world == World(rank=5, world_size=8, local_rank=1) and not world.is_main


def test_slurm_variables_when_more_than_one_task(clean_env):
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    assert distributed.from_environment(env) == World(rank=3, world_size=4, local_rank=1)
    # sbatch with a single task sets these too: that is one process.
    assert distributed.from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) == World()


def test_torchrun_inside_slurm_wins():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
           "SLURM_LOCALID": "0"}
    assert distributed.from_environment(env) == World(rank=1, world_size=2, local_rank=1)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent torchrun"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "inconsistent torchrun"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "inconsistent torchrun"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK not set"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK not set"),
        ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='one' is not a whole number"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, "inconsistent SLURM"),
        ({"SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, "SLURM_PROCID not set"),
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS='many'"),
    ],
)
def test_inconsistent_environment_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.from_environment(env)


def test_world_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="inconsistent"):
        World(rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------------
# one process: everything is a no-op


def test_init_is_a_no_op_with_one_process():
    distributed.init(World(), device_type="cpu")
    assert not dist.is_initialized()
    distributed.shutdown()  # nothing to shut down, no error


def test_init_under_slurm_without_master_addr_says_how_to_fix(clean_env):
    world = distributed.from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set.*torchrun.*scontrol"):
        distributed.init(world, device_type="cpu")
    assert not dist.is_initialized()


def test_gather_reduce_barrier_are_identities_with_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    gathered = distributed.gather_with_grad(x)
    assert gathered is x
    (gathered * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(4.0).expand(3, 4))
    loss = torch.tensor(1.5)
    assert distributed.all_reduce_mean(loss) is loss
    distributed.barrier()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.main_decides(True) and not distributed.main_decides(False)


def test_sync_batchnorm_leaves_the_model_alone_with_one_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert distributed.sync_batchnorm(model, device_type="cpu") is model
    assert type(model[1]) is nn.BatchNorm2d


def test_nt_xent_distributed_is_nt_xent_with_one_process():
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 8, generator=generator, requires_grad=True)
    z2 = torch.randn(6, 8, generator=generator, requires_grad=True)
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss, reference = nt_xent_distributed(z1, z2, 0.1), nt_xent(r1, r2, 0.1)
    loss.backward()
    reference.backward()
    assert torch.equal(loss, reference)
    assert torch.equal(z1.grad, r1.grad) and torch.equal(z2.grad, r2.grad)
    with pytest.raises(ValueError, match="no negatives"):
        nt_xent_distributed(torch.randn(1, 3), torch.randn(1, 3), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_distributed(torch.randn(4, 3), torch.randn(4, 2), 0.1)


# ---------------------------------------------------------------------------------------------------------------
# rank-0 logging


def test_main_only_filter_passes_records_on_rank_0_only():
    record = logging.LogRecord("simclr", logging.WARNING, __file__, 1, "hello", None, None)
    assert MainOnly(World(rank=0, world_size=2)).filter(record)
    assert not MainOnly(World(rank=1, world_size=2, local_rank=1)).filter(record)


def test_setup_logging_filter_silences_other_ranks_on_the_simclr_logger(caplog):
    logger = logging.getLogger("simclr")
    try:
        distributed.setup_logging_filter(World(rank=1, world_size=2, local_rank=1))
        with caplog.at_level(logging.INFO, logger="simclr"):
            logger.info("from rank 1")
        assert "from rank 1" not in caplog.text

        installed = distributed.setup_logging_filter(World(rank=0, world_size=2))  # replaces, never stacks
        assert [f for f in logger.filters if isinstance(f, MainOnly)] == [installed]
        with caplog.at_level(logging.INFO, logger="simclr"):
            logger.info("from rank 0")
        assert "from rank 0" in caplog.text
    finally:
        for f in [f for f in logger.filters if isinstance(f, MainOnly)]:
            logger.removeFilter(f)
