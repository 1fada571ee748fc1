"""SwAV (engine/methods/swav.py): Sinkhorn-Knopp and the swapped prediction against the paper's algorithm written as
float64 loops (gradients included), frozen and normalised prototypes, the queue, 1 process == 2 processes, bit-exact
resume, config errors, the preset and a run through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from multiprocess import run_on_two_processes
from test_moco import tiny_config as moco_config
from test_pretrain import CrashAt
from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, distributed, methods
from simclr_cli.engine.configs import SWAV_METHODS, PretrainConfig, SwAVConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.distributed import World
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.methods.base import Crops
from simclr_cli.engine.methods.swav import SwAV, sinkhorn, swapped_prediction
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.tasks import pretrain
from simclr_cli.engine.views import BatchViews

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
runner = CliRunner()
CROPS = (Crops(count=2, size=16, scale=(0.14, 1.0)), Crops(count=3, size=8, scale=(0.05, 0.14)))


def tiny_swav(*, K: int = 6, queue_length: int = 0, freeze: int = 0, processes: int = 1, seed: int = 0) -> SwAV:
    torch.manual_seed(seed)
    model = ModelConfig(arch="resnet18", width=0.25, proj_dim=8, head_output_bn=False).resolved(image_size=16)
    return SwAV(model, crops=CROPS, nmb_prototypes=K, epsilon=0.05, sinkhorn_iterations=3, temperature=0.1,
                queue_length=queue_length, queue_after_epochs=0, freeze_prototypes_epochs=freeze, processes=processes)


def tiny_views(images: int, *, seed: int = 3) -> list[torch.Tensor]:
    """One batch's crops: 2 x 16 px, then 3 x 8 px of `images` images, view-major."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * images, 3, 16, 16, generator=generator), torch.randn(3 * images, 3, 8, 8, generator=generator)]


# --- the formulas ------------------------------------------------------------------------------------------------


def reference_sinkhorn(scores: torch.Tensor, *, epsilon: float, iterations: int) -> torch.Tensor:
    """§3.1 / Algorithm 1 as loops in float64: Q = exp(scores / epsilon)^T (K x B) divided by its sum, then `iterations`
    times every row k divided by K times its sum and every column i by B times its sum; B Q^T is the codes."""
    B, K = scores.shape
    Q = [[math.exp(float(scores[i, k]) / epsilon) for i in range(B)] for k in range(K)]
    total = sum(sum(row) for row in Q)
    Q = [[q / total for q in row] for row in Q]
    for _ in range(iterations):
        for k in range(K):
            row = sum(Q[k])
            Q[k] = [q / (K * row) for q in Q[k]]
        for i in range(B):
            column = sum(Q[k][i] for k in range(K))
            for k in range(K):
                Q[k][i] /= B * column
    return torch.tensor([[B * Q[k][i] for k in range(K)] for i in range(B)], dtype=torch.float64)


def reference_swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, T: float) -> torch.Tensor:
    """Eq. 1-2 per sample: for each code a, each other crop v and each image i, -sum_k q_ik log p_ik with
    p = exp(s/T) / sum exp(s/T) (by an explicit log-sum-exp); the mean over images, over v, then over a."""
    V, n, K = scores.shape
    A = codes.shape[0]
    total = scores.new_zeros(())
    for a in range(A):
        for v in (v for v in range(V) if v != a):
            for i in range(n):
                logits = scores[v, i] / T
                top = logits.max()
                log_normaliser = top + torch.log(torch.exp(logits - top).sum())
                total = total - sum(codes[a, i, k] * (logits[k] - log_normaliser) for k in range(K)) / (n * (V - 1) * A)
    return total


@pytest.mark.parametrize("B, K, epsilon, iterations", [(5, 3, 0.05, 3), (4, 7, 0.05, 3), (6, 6, 0.1, 1), (3, 4, 0.5, 10)])
def test_sinkhorn_is_the_papers_algorithm(B, K, epsilon, iterations):
    generator = torch.Generator().manual_seed(B * 10 + K)
    scores = F.normalize(torch.randn(B, 4, generator=generator, dtype=torch.float64), dim=1) @ \
        F.normalize(torch.randn(K, 4, generator=generator, dtype=torch.float64), dim=1).T  # cosines, as z^T C
    want = reference_sinkhorn(scores, epsilon=epsilon, iterations=iterations)
    got = sinkhorn(scores.float(), epsilon=epsilon, iterations=iterations)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)  # every sample wholly assigned


def test_sinkhorn_converges_to_equal_shares_of_the_prototypes():
    scores = torch.randn(12, 4).tanh()
    codes = sinkhorn(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 3.0), rtol=0, atol=1e-4)  # B / K each


@pytest.mark.parametrize("V, A, n, K, T", [(5, 2, 3, 4, 0.1), (2, 1, 2, 3, 0.5), (3, 2, 1, 5, 1.0)])
def test_swapped_prediction_and_its_gradients_are_the_papers_loss(V, A, n, K, T):
    generator = torch.Generator().manual_seed(V * 100 + n)
    scores = torch.randn(V, n, K, generator=generator, dtype=torch.float64).tanh()
    codes = torch.softmax(torch.randn(A, n, K, generator=generator, dtype=torch.float64), dim=2)
    s_ref, s_got = scores.clone().requires_grad_(), scores.float().clone().requires_grad_()
    want = reference_swapped_prediction(s_ref, codes, T)
    got = swapped_prediction(s_got, codes.float(), T=T)
    want.backward()
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_got.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)


def test_the_methods_loss_and_the_prototypes_gradient_come_from_fixed_codes():
    """The loss of a batch is the reference loss of its scores with the reference Sinkhorn's codes of the 2 large
    crops; the prototypes' gradient is that loss's with the codes held constant (no gradient through the codes)."""
    method = tiny_swav(K=5)
    views = tiny_views(4)
    loss = method.loss(method.modules, views, rt=CPU)
    loss.backward()
    with torch.no_grad():
        z, _ = method.modules(views)  # (5 * 4, 8); BN in training mode gives the same features again
    z = z.double().view(5, 4, 8)
    C = method.modules.prototypes.weight.detach().double().clone().requires_grad_()
    scores = z @ C.T  # (V, n, K)
    codes = torch.stack([reference_sinkhorn(scores[a].detach(), epsilon=0.05, iterations=3) for a in range(2)])
    want = reference_swapped_prediction(scores, codes, 0.1)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(want, C, retain_graph=True)
    torch.testing.assert_close(method.modules.prototypes.weight.grad.double(), grad, rtol=1e-3, atol=1e-6)
    # The test can tell: codes that carried a gradient would give another one.
    def attached_codes(s: torch.Tensor) -> torch.Tensor:
        Q = torch.exp(s / 0.05).T
        Q = Q / Q.sum()
        for _ in range(3):
            Q = Q / Q.sum(dim=1, keepdim=True) / Q.shape[0]
            Q = Q / Q.sum(dim=0, keepdim=True) / Q.shape[1]
        return (Q * Q.shape[1]).T
    wrong = reference_swapped_prediction(scores, torch.stack([attached_codes(scores[a]) for a in range(2)]), 0.1)
    (wrong_grad,) = torch.autograd.grad(wrong, C)
    assert not torch.allclose(wrong_grad, grad, rtol=1e-2, atol=1e-4)


def test_prototypes_are_unit_length_frozen_in_the_first_epochs_then_updated():
    method = tiny_swav(freeze=1)
    prototypes = method.modules.prototypes.weight
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(6))  # from the start
    optimizer = torch.optim.SGD(method.modules.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for epoch, frozen in ((0, True), (1, False)):
        before = prototypes.detach().clone()
        method.loss(method.modules, tiny_views(4, seed=epoch), rt=CPU).backward()
        method.before_update(step=epoch + 1, epoch=epoch)
        assert (prototypes.grad is None) == frozen
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step=epoch + 1)
        # frozen: no update, no weight decay (the renormalisation of unit rows moves the last bit at most)
        assert torch.allclose(prototypes, before, rtol=0, atol=1e-6) == frozen
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(6))
    assert "momentum_buffer" in optimizer.state[prototypes]


def test_the_queue_fills_from_its_epoch_and_once_full_joins_the_sinkhorn():
    method = tiny_swav(K=5, queue_length=8)
    method.queue_after_epochs = 1
    views = tiny_views(4)
    method.loss(method.modules, views, rt=CPU)
    method.before_update(step=1, epoch=0)
    method.after_step(step=1)
    assert method.filled == 0 and not method.queue.any()  # epoch 0: not yet
    for step, seed, slots in ((2, 4, slice(0, 4)), (3, 5, slice(4, 8))):
        method.loss(method.modules, tiny_views(4, seed=seed), rt=CPU)
        features = method.features.clone()  # (2, 4, 8): the 2 large crops' z of the 4 images
        method.before_update(step=step, epoch=1)
        method.after_step(step=step)
        assert torch.equal(method.queue[:, slots], features)
    assert method.filled == 8 and method.ptr == 0
    # Full: the batch's codes are the last rows of the Sinkhorn over the queue's scores, then the batch's.
    with torch.no_grad():
        scores = method.modules(views)[1].view(5, 4, 5)[0]  # the first large crop's (4, 5)
        C = method.modules.prototypes.weight
        joined = torch.cat([method.queue[0] @ C.T, scores]).double()
    torch.testing.assert_close(method.codes(scores, 0).double(),
                               reference_sinkhorn(joined, epsilon=0.05, iterations=3)[-4:], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(method.codes(scores, 0), sinkhorn(scores, epsilon=0.05, iterations=3), atol=1e-3)


# --- config -------------------------------------------------------------------------------------------------------


def test_the_config_names_the_method_the_registry_holds():
    assert SWAV_METHODS == (SwAV.name,) and SwAV.name in methods.METHODS


@pytest.mark.parametrize("image_size, sizes", [(224, (224, 96)), (96, (96, 41)), (32, (32, 14)), (16, (16, 8))])
def test_crop_sizes_scale_with_the_image_as_96_to_224(image_size, sizes):
    assert SwAVConfig(nmb_crops=(2, 6)).with_sizes(image_size=image_size).size_crops == sizes
    assert SwAVConfig(nmb_crops=(2, 6), size_crops=(20, 10)).with_sizes(image_size=image_size).size_crops == (20, 10)


@pytest.mark.parametrize("image_size, crops, temperature, epsilon", [
    (224, (2, 6), 0.1, 0.05), (96, (2, 6), 0.1, 0.05), (65, (2, 6), 0.1, 0.05),
    (64, (2,), 0.5, 0.02), (32, (2,), 0.5, 0.02), (16, (2,), 0.5, 0.02),
])
def test_unset_crops_temperature_and_epsilon_are_the_papers_above_64_px_and_the_small_image_ones_at_or_below(
        image_size, crops, temperature, epsilon):
    swav = SwAVConfig().with_sizes(image_size=image_size)
    assert (swav.nmb_crops, swav.temperature, swav.epsilon) == (crops, temperature, epsilon)
    assert len(swav.size_crops) == len(swav.min_scale_crops) == len(swav.max_scale_crops) == len(crops)
    given = SwAVConfig(nmb_crops=(2, 4), temperature=0.2, epsilon=0.03).with_sizes(image_size=image_size)
    assert (given.nmb_crops, given.temperature, given.epsilon) == ((2, 4), 0.2, 0.03)


def test_the_large_crops_read_augment_crop_scale_and_the_small_ones_take_the_papers():
    swav = SwAVConfig(nmb_crops=(2, 6)).with_sizes(image_size=224, crop_scale=(0.14, 1.0))
    assert (swav.min_scale_crops, swav.max_scale_crops) == ((0.14, 0.05), (1.0, 0.14))
    assert SwAVConfig().with_sizes(image_size=16, crop_scale=(0.3, 1.0)).min_scale_crops == (0.3,)
    # Given explicitly, the lists win over augment.crop_scale's default, and agree with a crop_scale that was set.
    own = SwAVConfig(nmb_crops=(2,), min_scale_crops=(0.5,), max_scale_crops=(0.9,))
    assert own.with_sizes(image_size=16).min_scale_crops == (0.5,)
    assert own.with_sizes(image_size=16, crop_scale=(0.5, 0.9)).max_scale_crops == (0.9,)


def test_a_large_crop_scale_given_twice_differently_is_a_one_line_error():
    with pytest.raises(ConfigError) as caught:
        SwAVConfig(nmb_crops=(2, 6), min_scale_crops=(0.14, 0.05)).with_sizes(image_size=16, crop_scale=(0.3, 1.0))
    assert str(caught.value) == ("augment.crop_scale [0.3, 1.0] and swav.min_scale_crops [0.14, 0.05] disagree on the "
                                 "large crops' min scale (0.3 vs 0.14): leave swav.min_scale_crops unset to use "
                                 "augment.crop_scale, or make its first value 0.3")


@pytest.mark.parametrize("images, K", [(1_281_167, 3000), (30_000, 3000), (1797, 179), (24, 10)])
def test_prototypes_are_the_papers_3000_or_one_per_ten_images_on_small_data(images, K):
    assert SwAVConfig().resolved(method="swav", num_images=images, batch_size=8).nmb_prototypes == K
    assert SwAVConfig(nmb_prototypes=50).resolved(method="swav", num_images=images, batch_size=8).nmb_prototypes == 50


@pytest.mark.parametrize("section, message", [
    (SwAVConfig(queue_length=100), "swav.queue_length 100 is not a multiple of the global batch 64: the queue holds whole batches; use e.g. 64"),
    (SwAVConfig(epsilon=0.0), "swav.epsilon 0.0 must be > 0; the paper uses 0.05"),
    (SwAVConfig(temperature=-1.0), "swav.temperature -1.0 must be > 0; the paper uses 0.1"),
    (SwAVConfig(sinkhorn_iterations=0), "swav.sinkhorn_iterations 0 must be a whole number >= 1"),
    (SwAVConfig(nmb_prototypes=0), "swav.nmb_prototypes 0 must be a whole number >= 1"),
    (SwAVConfig(nmb_crops=(1,), min_scale_crops=(0.1,), max_scale_crops=(1.0,)), "swav.nmb_crops [1] must be crops per group"),
    (SwAVConfig(nmb_crops=(2, 6), size_crops=(32,)), "swav.size_crops [32] must give one value per crop group"),
    (SwAVConfig(size_crops=(32, 14)), "swav.size_crops gives one value per crop group: set swav.nmb_crops too"),
    (SwAVConfig(nmb_crops=(2, 6), size_crops=(32, 4)), "swav.size_crops [32, 4] must be sides in pixels from 8"),
    (SwAVConfig(nmb_crops=(2, 6), min_scale_crops=(0.14, 0.5), max_scale_crops=(1.0, 0.14)),
     "swav.min_scale_crops [0.14, 0.5] and max_scale_crops [1.0, 0.14] must be"),
    (SwAVConfig(freeze_prototypes_epochs=-1), "swav.freeze_prototypes_epochs -1 must be a whole number >= 0"),
])
def test_bad_settings_are_one_line_errors(section, message):
    with pytest.raises(ConfigError) as caught:
        section.resolved(method="swav", num_images=1000, batch_size=64)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# --- through the trainer --------------------------------------------------------------------------------------------


def tiny_config(folder: Path, **train) -> PretrainConfig:
    """test_moco's tiny run (24 images, batch 8, 2 epochs of 3 steps) with SwAV and a queue of one batch that fills in
    the second epoch (steps 4-6) and is used from step 5; multi-crop, which 16 px views do not get unasked."""
    cfg = moco_config(folder, method="swav", **train)
    cfg.swav.queue_length, cfg.swav.queue_after_epochs, cfg.swav.nmb_crops = 8, 1, (2, 6)
    return cfg


def test_resume_after_a_crash_restores_queue_and_prototypes_bit_exactly(image_folder, tmp_path):
    uninterrupted = tmp_path / "a"
    pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=uninterrupted)
    crashed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, progress=CrashAt(5))
    result = pretrain.run(tiny_config(image_folder, checkpoint_every=2), out=crashed, resume=True)
    assert result.resumed_from == 4 and result.steps == 6

    final = "checkpoints/step-000000006.safetensors"
    a, b = load_file(str(uninterrupted / final)), load_file(str(crashed / final))
    assert {"method/queue", "method/queue_ptr", "method/queue_filled", "model/prototypes.weight"} <= a.keys()
    assert int(a["method/queue_filled"]) == 8 and a["method/queue"].shape == (2, 8, 16)
    # everything but the global RNG's state, which a DataLoader's iter() advances once more in a resumed run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng/torch")
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (uninterrupted, crashed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    torch.testing.assert_close(a["model/prototypes.weight"].norm(dim=1), torch.ones(10))  # 24 images: 10 prototypes
    encoder = load_file(str(uninterrupted / "encoder.safetensors"))
    assert all(torch.equal(encoder[name], a[f"model/network.{name}"]) for name in encoder)  # f and g are published


def test_the_prototypes_do_not_move_in_the_frozen_first_epoch(image_folder, tmp_path):
    out = tmp_path / "run"
    pretrain.run(tiny_config(image_folder, epochs=1, checkpoint_every=1), out=out)  # 3 steps, all frozen
    first = load_file(str(out / "checkpoints/step-000000003.safetensors"))
    torch.manual_seed(0)
    method = methods.build(_resolved(tiny_config(image_folder, epochs=1)), processes=1)  # the weights it started from
    torch.testing.assert_close(first["model/prototypes.weight"], method.modules.prototypes.weight.detach(), rtol=0, atol=1e-6)


def _resolved(cfg: PretrainConfig) -> PretrainConfig:
    from simclr_cli.engine import defaults

    return defaults.resolve_pretrain(cfg, device=torch.device("cpu"), world_size=1, num_images=24)


# --- 1 process == 2 processes -----------------------------------------------------------------------------------------


def _three_steps(method: SwAV, net, views: list[torch.Tensor]) -> list[float]:
    """3 SGD steps on the same views: the first in a frozen epoch, the queue full (one batch) from the second."""
    # A small lr: larger steps of this tiny net on noise leave BN channels of almost no variance, where a rounding
    # difference of 1e-6 (another summation order) changes the next gradients by percents, on one process too.
    optimizer = torch.optim.SGD(method.modules.parameters(), lr=0.005, momentum=0.9)
    losses = []
    for step in range(3):
        net.train()
        loss = method.loss(net, views, rt=CPU)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_update(step=step + 1, epoch=min(step, 1))
        optimizer.step()
        method.after_step(step=step + 1)
        losses.append(float(distributed.all_reduce_mean(loss.detach())))
    return losses


def _swav_worker(world: World) -> None:
    images = 8
    views = tiny_views(images)  # the global batch's crops
    n = images // world.world_size
    mine = [torch.cat([x[(v * images + world.rank * n):(v * images + (world.rank + 1) * n)] for v in range(len(x) // images)])
            for x in views]  # this rank's images of every crop, view-major (EpochSampler's chunk)

    # Sinkhorn over the global batch: each rank's half of the columns gives its rows of one process's codes
    scores = torch.randn(images, 5, generator=torch.Generator().manual_seed(1)).tanh()
    part = sinkhorn(scores[world.rank * n:(world.rank + 1) * n], epsilon=0.05, iterations=3, processes=2)
    torch.testing.assert_close(part, sinkhorn(scores, epsilon=0.05, iterations=3)[world.rank * n:(world.rank + 1) * n])

    reference = tiny_swav(K=5, queue_length=8, freeze=1)  # one process, the whole global batch, plain BN
    want = _three_steps(reference, reference.modules, views)

    method = tiny_swav(K=5, queue_length=8, freeze=1, processes=world.world_size)
    method.modules = distributed.sync_batchnorm(method.modules, device_type="cpu")
    got = _three_steps(method, DistributedDataParallel(method.modules), mine)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want)), (got, want)
    assert method.filled == reference.filled == 8
    torch.testing.assert_close(method.queue, reference.queue, rtol=0, atol=5e-5)  # every rank's features, in rank order
    for key, value in method.modules.state_dict().items():  # f, g, the prototypes and BN statistics
        torch.testing.assert_close(value, reference.modules.state_dict()[key], rtol=0, atol=5e-5, msg=key)


def test_two_processes_give_the_losses_queue_and_prototypes_of_one():
    run_on_two_processes(_swav_worker)


# --- the command line ---------------------------------------------------------------------------------------------------


def test_pretrain_method_swav_then_info(tmp_path):
    from conftest import write_images

    images = tmp_path / "images"
    write_images(images, 24, size=20, seed=4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "--method", "swav", "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "swav.nmb_prototypes=12",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["swav"]["nmb_prototypes"] == 12
    # at 16 px: two crops at augment.crop_scale, temperature 0.5, epsilon 0.02, each written down
    assert {name: saved["swav"][name] for name in ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops",
                                                   "temperature", "epsilon")} == {
        "nmb_crops": [2], "size_crops": [16], "min_scale_crops": [0.08], "max_scale_crops": [1.0], "temperature": 0.5,
        "epsilon": 0.02}
    assert saved["train"]["temperature"] is None
    info = runner.invoke(app, ["info", str(out / "encoder.safetensors")])
    assert info.exit_code == 0 and "swav" in info.output, info.output
    assert checkpoint.load_encoder(out / "encoder.safetensors")[1].method == "swav"


def test_gpus_2_through_the_command_line_logs_the_losses_of_one_process(image_folder, tmp_path):
    """--gpus 2 --device cpu: torchrun's gloo workers, the multi-crop views of half the batch each, the Sinkhorn over
    both, the queue (one batch, used from step 2) filled from both in rank order."""
    from test_cli import _losses

    args = ["pretrain", str(image_folder), "--method", "swav", "--arch", "resnet18", "--width", "0.25", "--image-size",
            "16", "--batch-size", "8", "--max-steps", "4", "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--set", "train.log_every=1", "--set", "swav.queue_length=8", "--set", "swav.queue_after_epochs=0",
            "--set", "swav.nmb_crops=[2,6]"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--gpus", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = (_losses(tmp_path / run) for run in ("one", "two"))
    assert len(single) == len(double) == 4
    assert all(abs(a - b) / abs(a) < 1e-3 for a, b in zip(single, double)), (single, double)


def test_benchmark_measures_swavs_step_on_its_crops(image_folder, monkeypatch):
    from test_benchmark import TINY
    from simclr_cli.engine.tasks import benchmark

    made = []
    monkeypatch.setattr(benchmark, "BatchViews", lambda *args, **kwargs: made.append(kwargs["crops"]) or BatchViews(*args, **kwargs))
    result = runner.invoke(app, ["benchmark", str(image_folder), *TINY, "--set", "train.method=swav",
                                 "--set", "swav.nmb_crops=[2,6]", "--no-baseline", "--json"])
    assert result.exit_code == 0, result.output
    assert made and made[0] == (Crops(count=2, size=16, scale=(0.08, 1.0)), Crops(count=6, size=8, scale=(0.05, 0.14)))
    assert json.loads(result.stdout[result.stdout.index("{"):])["model_images_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--set", "swav.queue_length=16"], "error: swav.queue_length applies to --method swav only, not simclr"),
    (["--method", "swav", "--set", "swav.queue_length=12"], "error: swav.queue_length 12 is not a multiple of the global batch 8"),
    (["--method", "swav", "--set", "swav.epsilon=0"], "error: swav.epsilon 0.0 must be > 0"),
    (["--method", "swav", "--set", "augment.crop_scale=[0.3,1.0]", "--set", "swav.nmb_crops=[2]",
      "--set", "swav.min_scale_crops=[0.2]"], "error: augment.crop_scale [0.3, 1.0] and swav.min_scale_crops [0.2] disagree"),
    (["--method", "swav", "--set", "swav.size_crops=[16,8]"], "error: swav.size_crops gives one value per crop group: set swav.nmb_crops too"),
    (["--method", "swav", "--temperature", "0.1"], "error: train.temperature is NT-Xent's (--method simclr); swav reads swav.temperature"),
])
def test_bad_swav_options_are_one_line_errors(image_folder, tmp_path, args, message):
    from test_cli import one_line_error

    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size",
                                 "16", "--batch-size", "8", "--device", "cpu", "--workers", "0", *args,
                                 "--out", str(tmp_path / "run")])
    assert one_line_error(result).startswith(message)


def test_the_preset_holds_the_papers_recipe_and_runs(image_folder, tmp_path):
    from simclr_cli.config import preset_path, resolve_pretrain

    cfg = resolve_pretrain(data=None, preset="swav", sets=None, flags={})
    assert cfg.train.method == "swav" and (cfg.train.batch_size, cfg.train.epochs) == (4096, 800)
    assert (cfg.swav.nmb_prototypes, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations, cfg.swav.temperature) == (3000, 0.05, 3, 0.1)
    assert (cfg.swav.nmb_crops, cfg.swav.size_crops) == ((2, 6), (224, 96))
    assert (cfg.swav.min_scale_crops, cfg.swav.max_scale_crops) == ((0.14, 0.05), (1.0, 0.14))
    assert (cfg.optim.name, cfg.optim.lr * 4096 / 256, cfg.optim.weight_decay) == ("lars", pytest.approx(4.8), 1e-6)
    text = preset_path("swav").read_text()
    assert "75.3%" in text and "--preset swav" in text
    result = runner.invoke(app, ["pretrain", str(image_folder), "--preset", "swav", "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--max-steps", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "swav.size_crops=[16,8]",
                                 "--set", "swav.nmb_prototypes=12", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
