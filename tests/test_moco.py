"""MoCo v1/v2 (engine/methods/moco.py): InfoNCE with a queue and the momentum update against the papers' formulas,
the queue's wrap, 1 process == 2 processes, bit-exact resume, config errors, and a run through the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from conftest import write_images
from multiprocess import run_on_two_processes
from test_cli_eval import labelled  # noqa: F401  (a fixture: three colour classes in train/ and val/)
from test_pretrain import CrashAt
from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, distributed, methods
from simclr_cli.engine.configs import MOCO_METHODS, MOCO_PAPER_T, MoCoConfig, PretrainConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.distributed import World
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.methods.base import Method
from simclr_cli.engine.methods.moco import MoCo, MoCoV1, MoCoV2, info_nce, momentum_update
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.tasks import pretrain

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
runner = CliRunner()


def tiny_moco(*, K: int = 12, m: float = 0.9, T: float = 0.2, seed: int = 0, processes: int = 1) -> MoCo:
    torch.manual_seed(seed)
    model = ModelConfig(arch="resnet18", width=0.25, proj_dim=8, head_output_bn=False).resolved(image_size=16)
    return MoCoV2(model, image_size=16, K=K, m=m, T=T, processes=processes)


# --- the formulas ------------------------------------------------------------------------------------------------


def reference_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """MoCo eq. 1 written out: for each query, -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T)), by loops and an
    explicit log-sum-exp; the mean over the queries."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        terms = [torch.dot(q[i], k[i]) / T] + [torch.dot(q[i], queue[j]) / T for j in range(queue.shape[0])]
        stacked = torch.stack(terms)
        top = stacked.max()
        log_denominator = top + torch.log(torch.exp(stacked - top).sum())
        total = total - (terms[0] - log_denominator)
    return total / q.shape[0]


@pytest.mark.parametrize("n, K, D, T", [(4, 7, 5, 0.07), (1, 3, 2, 0.2), (6, 16, 8, 1.0)])
def test_info_nce_and_its_gradients_match_the_papers_formula(n, K, D, T):
    generator = torch.Generator().manual_seed(n * 100 + K)
    q = F.normalize(torch.randn(n, D, generator=generator, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(n, D, generator=generator, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(K, D, generator=generator, dtype=torch.float64), dim=1)
    q_ref, q_got = q.clone().requires_grad_(), q.float().clone().requires_grad_()
    want = reference_info_nce(q_ref, k, queue, T)
    got = info_nce(q_got, k.float(), queue.float(), T)
    want.backward()
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_got.grad.double(), q_ref.grad, rtol=1e-4, atol=1e-6)


def test_the_momentum_update_is_the_papers_formula():
    torch.manual_seed(0)
    key, query = nn.Linear(5, 3), nn.Linear(5, 3)
    before = {name: p.detach().clone() for name, p in key.named_parameters()}
    momentum_update(key, query, m=0.99)
    for name, p in key.named_parameters():
        torch.testing.assert_close(p, 0.99 * before[name] + 0.01 * dict(query.named_parameters())[name], rtol=0, atol=1e-7)
    assert not any(p.requires_grad is False for p in query.parameters())  # the query is left alone


def test_the_key_encoder_starts_as_the_query_and_takes_no_gradients():
    method = tiny_moco()
    query, key = method.modules.query.state_dict(), method.modules.key.state_dict()
    assert query.keys() == key.keys() and all(torch.equal(query[name], key[name]) for name in query)
    assert not any(p.requires_grad for p in method.modules.key.parameters())
    assert method.network is method.modules.query
    loss = method.loss(method.modules, [torch.randn(8, 3, 16, 16)], rt=CPU)
    loss.backward()
    assert all(p.grad is None for p in method.modules.key.parameters())
    assert all(p.grad is not None for p in method.modules.query.parameters())
    with torch.no_grad():  # as if train.init had loaded other weights into f_q
        for p in method.modules.query.parameters():
            p.add_(1.0)
    method.after_init()
    assert all(torch.equal(a, b) for a, b in zip(method.modules.query.parameters(), method.modules.key.parameters()))


def test_after_a_step_the_key_follows_by_momentum_and_the_keys_are_enqueued():
    method = tiny_moco(K=12, m=0.9)
    x = torch.randn(8, 3, 16, 16)  # 4 images: query views, then key views
    method.loss(method.modules, [x], rt=CPU)
    keys = method.keys.clone()
    with torch.no_grad():
        for p in method.modules.query.parameters():
            p.mul_(2.0)  # an "update"
    key_before = [p.clone() for p in method.modules.key.parameters()]
    method.after_step(step=1)
    for p, q, before in zip(method.modules.key.parameters(), method.modules.query.parameters(), key_before):
        torch.testing.assert_close(p, 0.9 * before + 0.1 * q, rtol=0, atol=1e-6)
    assert torch.equal(method.queue[:4], keys) and method.ptr == 4
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))


def test_the_queue_wraps_round_when_the_batch_does_not_divide_K():
    method = tiny_moco(K=10)
    start = method.queue.clone()
    batches = [torch.full((4, 8), float(i)) for i in (1, 2, 3)]
    method.enqueue(batches[0])
    method.enqueue(batches[1])
    assert method.ptr == 8 and torch.equal(method.queue[8:], start[8:])
    method.enqueue(batches[2])  # slots 8, 9, then 0, 1: the oldest keys go first
    assert method.ptr == 2
    assert method.queue[:, 0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


# --- config -------------------------------------------------------------------------------------------------------


def test_the_config_names_the_moco_methods_the_registry_holds():
    assert MOCO_METHODS == (MoCoV1.name, MoCoV2.name) == tuple(MOCO_PAPER_T)
    assert all(name in methods.METHODS for name in MOCO_METHODS)


def test_K_is_the_papers_on_big_data_and_sized_from_small_data():
    assert MoCoConfig().resolved(method="moco-v2", num_images=1_281_167, batch_size=256) == MoCoConfig(K=65536, T=0.2)
    assert MoCoConfig().resolved(method="moco-v1", num_images=50_000, batch_size=256).K == 24832  # <= half, x256
    assert MoCoConfig().resolved(method="moco-v1", num_images=50_000, batch_size=256).T == 0.07
    assert MoCoConfig(K=100, T=0.5).resolved(method="moco-v1", num_images=1000, batch_size=32) == MoCoConfig(K=100, T=0.5)


@pytest.mark.parametrize("section, images, batch, error, message", [
    (MoCoConfig(K=1000), 1000, 8, DataError, "moco.K 1000 is not below the dataset size (1000 images)"),
    (MoCoConfig(K=4), 1000, 8, ConfigError, "moco.K 4 is smaller than the global batch 8"),
    (MoCoConfig(), 8, 8, DataError, "the data holds 8 images, too few for a MoCo queue"),
    (MoCoConfig(K=0), 100, 8, ConfigError, "moco.K 0 must be a whole number >= 1"),
    (MoCoConfig(m=1.0), 100, 8, ConfigError, "moco.m 1.0 must be in [0, 1)"),
    (MoCoConfig(T=0.0), 100, 8, ConfigError, "moco.T 0.0 must be > 0"),
])
def test_a_queue_that_cannot_work_is_refused(section, images, batch, error, message):
    with pytest.raises(error) as caught:
        section.resolved(method="moco-v2", num_images=images, batch_size=batch)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# --- through the trainer --------------------------------------------------------------------------------------------


def tiny_config(folder: Path, method: str = "moco-v2", **train) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.data.source, cfg.data.workers = str(folder), 0
    cfg.model.arch, cfg.model.width, cfg.model.proj_dim = "resnet18", 0.25, 16
    cfg.augment.image_size = 16
    cfg.train.method = method
    cfg.train.batch_size, cfg.train.epochs, cfg.train.log_every = 8, 2, 1
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_epochs = "sgd", 0.5, 0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_resume_after_a_crash_restores_queue_and_key_encoder_bit_exactly(image_folder, tmp_path):
    uninterrupted = tmp_path / "a"
    pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=uninterrupted)
    crashed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, progress=CrashAt(5))
    assert (crashed / "checkpoints" / "step-000000004.safetensors").exists()
    result = pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, resume=True)
    assert result.resumed_from == 4 and result.steps == 6

    final = "checkpoints/step-000000006.safetensors"
    a, b = load_file(str(uninterrupted / final)), load_file(str(crashed / final))
    assert {"method/queue", "method/queue_ptr"} <= a.keys() and any(k.startswith("model/key.") for k in a)
    # Queue, pointer, f_q, f_k and optimiser; not the global RNG's state, which a DataLoader's iter() advances once
    # more in a run resumed mid-epoch (SimCLR's checkpoints differ there too; nothing in a step draws from it).
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng/torch")
    assert int(a["method/queue_ptr"]) == 6 * 8 % 8  # K = 8 on 24 images at batch 8: the queue wrapped every step
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (uninterrupted, crashed)]
    assert losses[0] == losses[1]
    encoder = load_file(str(uninterrupted / "encoder.safetensors"))
    assert all(torch.equal(encoder[name], a[f"model/query.{name}"]) for name in encoder)  # f_q is what is published


def test_the_published_encoder_is_the_query_encoder_and_names_the_method(image_folder, tmp_path):
    out = tmp_path / "run"
    pretrain.run(tiny_config(image_folder, method="moco-v1", max_steps=2), out=out)
    model, info = checkpoint.load_encoder(out / "encoder.safetensors")
    assert info.method == "moco-v1"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["moco"] == {"K": 8, "m": 0.999, "T": 0.07} and saved["train"]["temperature"] is None


# --- 1 process == 2 processes -----------------------------------------------------------------------------------------


def _two_steps(method: Method, net, views: torch.Tensor, *, steps: int = 2,
               begin: Callable[[int], None] = lambda step: None) -> list[float]:
    """`steps` SGD steps on the same views, `begin(step)` before each; the global batch's loss after each."""
    optimizer = torch.optim.SGD([p for p in method.modules.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    losses = []
    for step in range(steps):
        net.train()
        begin(step)
        loss = method.loss(net, [views], rt=CPU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(step=step + 1)
        losses.append(float(distributed.all_reduce_mean(loss.detach())))
    return losses


def _moco_worker(world: World) -> None:
    images = 8
    generator = torch.Generator().manual_seed(3)
    x_q = torch.randn(images, 3, 16, 16, generator=generator)  # the global batch's query views
    x_k = torch.randn(images, 3, 16, 16, generator=generator)  # and key views
    n = images // world.world_size
    mine = slice(world.rank * n, (world.rank + 1) * n)  # EpochSampler's chunk for this rank

    reference = tiny_moco(K=12)  # one process, the whole global batch, plain BN
    want = _two_steps(reference, reference.modules, torch.cat([x_q, x_k]))

    method = tiny_moco(K=12, processes=world.world_size)
    method.modules = distributed.sync_batchnorm(method.modules, device_type="cpu")
    got = _two_steps(method, DistributedDataParallel(method.modules), torch.cat([x_q[mine], x_k[mine]]))
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want)), (got, want)
    assert method.ptr == reference.ptr == 4  # 2 steps of 8 keys round a queue of 12
    torch.testing.assert_close(method.queue, reference.queue, rtol=0, atol=1e-4)  # every rank's keys, in rank order
    for key, value in method.modules.state_dict().items():  # f_q, f_k and both encoders' BN statistics
        torch.testing.assert_close(value, reference.modules.state_dict()[key], rtol=0, atol=1e-4, msg=key)


def test_two_processes_give_the_losses_and_queue_of_one():
    run_on_two_processes(_moco_worker)


# --- the command line ---------------------------------------------------------------------------------------------------


def test_pretrain_method_moco_v2_then_knn_and_info(tmp_path, labelled):
    images = tmp_path / "images"
    write_images(images, 24, size=20, seed=4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "--method", "moco-v2", "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "moco.K=12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["moco"]["K"] == 12
    info = runner.invoke(app, ["info", str(out / "encoder.safetensors")])
    assert info.exit_code == 0 and "moco-v2" in info.output, info.output
    knn = runner.invoke(app, ["knn", str(out / "encoder.safetensors"), "--data", str(labelled),
                              "-k", "3", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"])
    assert knn.exit_code == 0, knn.output


@pytest.mark.parametrize("args, message", [
    (["--method", "moco-v3"], "error: method 'moco-v3' is not supported; choose one of simclr, moco-v1, moco-v2"),
    (["--set", "moco.m=0.99"], "error: moco.m applies to --method moco-v1 or moco-v2 only, not simclr"),
    (["--method", "moco-v2", "--set", "moco.K=24"], "error: moco.K 24 is not below the dataset size (24 images)"),
    (["--method", "moco-v1", "--temperature", "0.1"], "error: train.temperature is NT-Xent's (--method simclr)"),
])
def test_bad_moco_options_are_one_line_errors(image_folder, tmp_path, args, message):
    from test_cli import one_line_error

    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size",
                                 "16", "--batch-size", "8", "--device", "cpu", "--workers", "0", *args,
                                 "--out", str(tmp_path / "run")])
    assert one_line_error(result).startswith(message)


@pytest.mark.parametrize("name, T, head_layers, blur, target", [("moco-v1", 0.07, 1, 0.0, "60.6%"),
                                                                ("moco-v2", 0.2, 2, 0.5, "67.5%")])
def test_the_presets_hold_the_papers_recipes_and_run(name, T, head_layers, blur, target, image_folder, tmp_path):
    from simclr_cli.config import preset_path, resolve_pretrain

    cfg = resolve_pretrain(data=None, preset=name, sets=None, flags={})
    assert (cfg.train.method, cfg.moco.K, cfg.moco.m, cfg.moco.T) == (name, 65536, 0.999, T)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == ("sgd", 0.03, 1e-4, 0.9)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.head_layers, cfg.augment.blur_p) == (256, 200, head_layers, blur)
    assert target in preset_path(name).read_text() and f"--preset {name}" in preset_path(name).read_text()
    result = runner.invoke(app, ["pretrain", str(image_folder), "--preset", name, "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--max-steps", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "moco.K=12", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
