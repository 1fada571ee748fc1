"""PIRL (engine/methods/pirl.py): the NCE loss and the bank's update against the paper's formulas, the jigsaw's tiles,
1 process == 2 processes, bit-exact resume, config errors, and a run through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from conftest import write_images
from multiprocess import run_on_two_processes
from test_moco import _two_steps, tiny_config
from test_pretrain import CrashAt
from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, distributed, methods
from simclr_cli.engine.configs import PIRL_METHODS, PIRLConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.distributed import World
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.methods.base import StepImages
from simclr_cli.engine.methods.pirl import PIRL, bank_update, cut, draw_jigsaw, nce, tile_size
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.tasks import pretrain

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
runner = CliRunner()


def tiny_pirl(*, images: int = 20, negatives: int = 6, momentum: float = 0.5, lam: float = 0.5, seed: int = 0,
              processes: int = 1) -> PIRL:
    torch.manual_seed(seed)
    model = ModelConfig(arch="resnet18", width=0.25, proj_dim=8, head_layers=1, head_output_bn=False).resolved(image_size=16)
    return PIRL(model, image_size=16, bank_size=images, negatives=negatives, momentum=momentum, T=0.07, lam=lam,
                seed=seed, processes=processes)


# --- the formulas ------------------------------------------------------------------------------------------------


def reference_nce(q, positives, negatives, *, own_index, negative_index, T, Z, N, D):
    """Eqs. 3-4 written out, per image: h(a, b) = P / (P + N/|D|) with P = exp(s(a, b)/T) / Z, and
    -log h(q_i, m_i) - sum over the negatives other than image i of log(1 - h(q_i, m_j)); the mean over images."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        def h(m):
            p = torch.exp(torch.dot(q[i], m) / T) / Z
            return p / (p + N / D)

        loss = -torch.log(h(positives[i]))
        for j in range(negatives.shape[0]):
            if negative_index[j] != own_index[i]:
                loss = loss - torch.log(1 - h(negatives[j]))
        total = total + loss
    return total / q.shape[0]


@pytest.mark.parametrize("n, N, dim, T, Z, D", [(4, 7, 5, 0.07, 3.0e6, 30), (1, 3, 2, 0.5, 1.0, 10), (6, 16, 8, 1.0, 40.0, 16)])
def test_the_nce_loss_and_its_gradients_match_the_papers_formula(n, N, dim, T, Z, D):
    generator = torch.Generator().manual_seed(n * 100 + N)
    q = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(D, dim, generator=generator, dtype=torch.float64), dim=1)
    own_index = torch.randperm(D, generator=generator)[:n]
    negative_index = torch.randint(D, (N,), generator=generator)
    negative_index[0] = own_index[0]  # a draw of the image itself, left out of its sum
    q_ref, q_got = q.clone().requires_grad_(), q.float().clone().requires_grad_()
    want = reference_nce(q_ref, bank[own_index], bank[negative_index], own_index=own_index,
                         negative_index=negative_index, T=T, Z=Z, N=N, D=D)
    got = nce(q_got, bank[own_index].float(), bank[negative_index].float(),
              own=own_index[:, None] == negative_index[None, :], T=T, log_Z=math.log(Z), noise=N / D)
    want.backward()
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_got.grad.double(), q_ref.grad, rtol=1e-4, atol=1e-5)


def test_the_method_loss_is_eq_5_with_Z_from_the_first_batch():
    method = tiny_pirl(images=20, negatives=6, lam=0.3)
    x = torch.randn(8, 3, 16, 16)  # 4 images: their views, then the views the jigsaws are cut from
    indices = torch.tensor([3, 0, 17, 9])
    method.begin_step(StepImages(indices=indices, epoch=1, step=5))
    bank = method.bank.clone()
    loss = method.loss(method.modules, [x], rt=CPU)

    tiles = cut(x[4:], draw_jigsaw(seed=0, epoch=1, indices=indices.numpy(), image_size=16))
    f, g = (F.normalize(t.double(), dim=1) for t in method.modules(x[:4], tiles))  # the same batches: the same BN
    drawn = method.negative_indices(5)
    scores = torch.cat([(g * bank[indices].double()).sum(1, keepdim=True), g @ bank[drawn].double().T], 1) / 0.07
    Z = 20 * torch.exp(scores).mean().item()  # |D| mean exp(s/T) over the first batch's jigsaw scores
    assert math.isclose(method.Z, Z, rel_tol=1e-4)  # exp(s/T) magnifies fp32 rounding in s 14-fold
    terms = [reference_nce(q, bank[indices].double(), bank[drawn].double(), own_index=indices, negative_index=drawn,
                           T=0.07, Z=Z, N=6, D=20) for q in (g, f)]
    torch.testing.assert_close(loss.double(), 0.3 * terms[0] + 0.7 * terms[1], rtol=1e-4, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in method.modules.parameters())  # f, the tile and the jigsaw heads all learn


def test_the_negatives_are_drawn_from_seed_and_step_alone():
    a, b = tiny_pirl(images=1000, negatives=50), tiny_pirl(images=1000, negatives=50)
    assert torch.equal(a.negative_indices(3), b.negative_indices(3))
    assert not torch.equal(a.negative_indices(3), a.negative_indices(4))
    drawn = a.negative_indices(0)
    assert drawn.shape == (50,) and 0 <= int(drawn.min()) and int(drawn.max()) < 1000


def test_the_bank_update_is_the_moving_average_renormalised():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(10, 4, generator=generator), dim=1)
    f = F.normalize(torch.randn(3, 4, generator=generator), dim=1)
    indices = torch.tensor([7, 2, 5])
    want = bank.double().clone()
    for row, i in enumerate(indices.tolist()):  # m_I <- 0.5 m_I + 0.5 f(v_I), then unit length (official code)
        average = [0.5 * want[i, d].item() + 0.5 * f[row, d].item() for d in range(4)]
        norm = math.sqrt(sum(v * v for v in average))
        want[i] = torch.tensor([v / norm for v in average], dtype=torch.float64)
    bank_update(bank, indices, f, momentum=0.5)
    torch.testing.assert_close(bank.double(), want, rtol=0, atol=1e-6)


# --- the jigsaw --------------------------------------------------------------------------------------------------


def test_the_tile_size_is_the_papers_share_of_a_cell():
    assert [tile_size(s) for s in (255, 224, 96, 32, 16)] == [64, 56, 24, 8, 4]


@pytest.mark.parametrize("size", [16, 32, 40])
def test_every_tile_is_a_crop_of_the_cell_it_claims_and_the_order_is_recovered(size):
    cell = size // 3
    colours = torch.arange(9, dtype=torch.float32) + 1  # cell k (row-major) is the constant colour k + 1
    image = torch.zeros(3, size, size)
    for k in range(9):
        image[:, k // 3 * cell : (k // 3 + 1) * cell, k % 3 * cell : (k % 3 + 1) * cell] = colours[k]
    x = image.expand(5, -1, -1, -1).clone()
    x[:, 1] *= 10  # a second channel, to see that the channels stay apart
    jigsaw = draw_jigsaw(seed=1, epoch=2, indices=np.array([0, 4, 9, 13, 200]), image_size=size)
    tiles = cut(x, jigsaw).reshape(5, 9, 3, tile_size(size), tile_size(size))
    recovered = tiles[:, :, 0].flatten(2)  # (5, 9, t*t)
    assert bool((recovered == recovered[..., :1]).all())  # every tile lies inside one cell: one colour
    assert torch.equal(recovered[..., 0].long() - 1, jigsaw.cells)  # ... the one it claims
    assert torch.equal(tiles[:, :, 1], 10 * tiles[:, :, 0])
    assert all(sorted(row) == list(range(9)) for row in jigsaw.cells.tolist())  # a permutation
    assert len({tuple(row) for row in jigsaw.cells.tolist()}) > 1  # each image its own
    rows, cols = jigsaw.cells // 3 * cell, jigsaw.cells % 3 * cell
    assert bool(((jigsaw.tops >= rows) & (jigsaw.tops + jigsaw.tile <= rows + cell)).all())
    assert bool(((jigsaw.lefts >= cols) & (jigsaw.lefts + jigsaw.tile <= cols + cell)).all())


def test_the_jigsaw_is_a_function_of_seed_epoch_and_image_alone():
    whole = draw_jigsaw(seed=3, epoch=1, indices=np.arange(10), image_size=224)
    part = draw_jigsaw(seed=3, epoch=1, indices=np.array([7, 2]), image_size=224)
    assert torch.equal(part.cells, whole.cells[[7, 2]]) and torch.equal(part.tops, whole.tops[[7, 2]])
    assert not torch.equal(draw_jigsaw(seed=3, epoch=2, indices=np.arange(10), image_size=224).cells, whole.cells)
    offsets = torch.cat([whole.tops - whole.cells // 3 * 74, whole.lefts - whole.cells % 3 * 74])
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 74 - 56 and len(offsets.unique()) > 5  # the gap varies


# --- config ------------------------------------------------------------------------------------------------------


def test_negatives_are_the_papers_on_big_data_and_sized_from_small_data():
    assert PIRL_METHODS == (PIRL.name,) and PIRL.name in methods.METHODS
    assert PIRLConfig().resolved(method="pirl", num_images=1_281_167, batch_size=256) == PIRLConfig(
        negatives=32000, bank_size=1_281_167)
    assert PIRLConfig().resolved(method="pirl", num_images=1797, batch_size=64).negatives == 898
    assert PIRLConfig(negatives=100).resolved(method="pirl", num_images=1000, batch_size=32).negatives == 100


@pytest.mark.parametrize("section, images, error, message", [
    (PIRLConfig(negatives=1000), 1000, DataError, "pirl.negatives 1000 is not below the number of images (1000)"),
    (PIRLConfig(negatives=0), 100, ConfigError, "pirl.negatives 0 must be a whole number >= 1"),
    (PIRLConfig(momentum=1.0), 100, ConfigError, "pirl.momentum 1.0 must be in [0, 1)"),
    (PIRLConfig(T=0.0), 100, ConfigError, "pirl.T 0.0 must be > 0"),
    (PIRLConfig(lam=1.5), 100, ConfigError, "pirl.lam 1.5 must be in [0, 1]"),
    (PIRLConfig(bank_size=50), 100, DataError, "pirl.bank_size 50 is not the number of images (100)"),
])
def test_settings_that_cannot_work_are_refused(section, images, error, message):
    with pytest.raises(error) as caught:
        section.resolved(method="pirl", num_images=images, batch_size=8)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# --- through the trainer --------------------------------------------------------------------------------------------


def test_resume_after_a_crash_restores_the_bank_bit_exactly(image_folder, tmp_path):
    uninterrupted = tmp_path / "a"
    pretrain.run(tiny_config(image_folder, method="pirl", checkpoint_every=2), out=uninterrupted)
    crashed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_config(image_folder, method="pirl", checkpoint_every=2), out=crashed, progress=CrashAt(5))
    result = pretrain.run(tiny_config(image_folder, method="pirl", checkpoint_every=2), out=crashed, resume=True)
    assert result.resumed_from == 4 and result.steps == 6

    final = "checkpoints/step-000000006.safetensors"
    a, b = load_file(str(uninterrupted / final)), load_file(str(crashed / final))
    assert {"method/bank", "method/Z"} <= a.keys() and a["method/bank"].shape == (24, 16) and float(a["method/Z"]) > 0
    # Bank, Z, modules and optimiser; not the global RNG's state (test_moco says why).
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng/torch")
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (uninterrupted, crashed)]
    assert losses[0] == losses[1]
    encoder = load_file(str(uninterrupted / "encoder.safetensors"))
    assert all(torch.equal(encoder[name], a[f"model/network.{name}"]) for name in encoder)  # f is what is published
    assert any(k.startswith("model/jigsaw_head.") for k in a) and not any("jigsaw" in k for k in encoder)


# --- 1 process == 2 processes -----------------------------------------------------------------------------------------


def _pirl_worker(world: World) -> None:
    images = 8
    generator = torch.Generator().manual_seed(3)
    x_image = torch.randn(images, 3, 16, 16, generator=generator)  # the global batch's image views
    x_jigsaw = torch.randn(images, 3, 16, 16, generator=generator)  # and the views the jigsaws are cut from
    indices = torch.tensor([11, 2, 7, 19, 0, 5, 14, 8])
    n = images // world.world_size
    mine = slice(world.rank * n, (world.rank + 1) * n)  # EpochSampler's chunk for this rank

    reference = tiny_pirl(images=20, negatives=6)  # one process, the whole global batch, plain BN
    want = _two_steps(reference, reference.modules, torch.cat([x_image, x_jigsaw]),
                      begin=lambda step: reference.begin_step(StepImages(indices=indices, epoch=0, step=step)))

    method = tiny_pirl(images=20, negatives=6, processes=world.world_size)
    method.modules = distributed.sync_batchnorm(method.modules, device_type="cpu")
    got = _two_steps(method, DistributedDataParallel(method.modules), torch.cat([x_image[mine], x_jigsaw[mine]]),
                     begin=lambda step: method.begin_step(StepImages(indices=indices[mine], epoch=0, step=step)))
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want)), (got, want)
    assert math.isclose(method.Z, reference.Z, rel_tol=1e-5)
    torch.testing.assert_close(method.bank, reference.bank, rtol=0, atol=1e-4)  # every rank's rows, in rank order
    for key, value in method.modules.state_dict().items():  # encoder, both heads and the BN statistics
        torch.testing.assert_close(value, reference.modules.state_dict()[key], rtol=1e-5, atol=1e-4, msg=key)


def test_two_processes_give_the_losses_and_bank_of_one():
    run_on_two_processes(_pirl_worker)


# --- the command line ---------------------------------------------------------------------------------------------------


def test_pretrain_method_pirl_then_info(tmp_path):
    images = tmp_path / "images"
    write_images(images, 24, size=20, seed=4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "--method", "pirl", "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "pirl.negatives=10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["pirl"] == {"negatives": 10, "momentum": 0.5, "T": 0.2, "lam": 0.5, "bank_size": 24}  # T at 16 px
    assert checkpoint.load_encoder(out / "encoder.safetensors")[1].method == "pirl"
    info = runner.invoke(app, ["info", str(out / "encoder.safetensors")])
    assert info.exit_code == 0 and "pirl" in info.output, info.output


@pytest.mark.parametrize("args, message", [
    (["--set", "pirl.T=0.2"], "error: pirl.T applies to --method pirl only, not simclr"),
    (["--method", "pirl", "--set", "pirl.negatives=24"], "error: pirl.negatives 24 is not below the number of images (24)"),
    (["--method", "pirl", "--set", "pirl.lam=2"], "error: pirl.lam 2.0 must be in [0, 1]"),
    (["--method", "pirl", "--temperature", "0.1"], "error: train.temperature is NT-Xent's (--method simclr); pirl reads pirl.T"),
    (["--method", "pirl", "--set", "pirl.tau=0.1"], "error: unknown config key 'pirl.tau'; valid keys in pirl: negatives"),
])
def test_bad_pirl_options_are_one_line_errors(image_folder, tmp_path, args, message):
    from test_cli import one_line_error

    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size",
                                 "16", "--batch-size", "8", "--device", "cpu", "--workers", "0", *args,
                                 "--out", str(tmp_path / "run")])
    assert one_line_error(result).startswith(message) and result.exit_code != 0


def test_T_is_the_papers_on_imagenet_sized_views_and_softer_at_64_px_and_below():
    assert PIRLConfig().with_sizes(image_size=224).T == 0.07
    assert PIRLConfig().with_sizes(image_size=64).T == PIRLConfig().with_sizes(image_size=16).T == 0.2
    assert PIRLConfig(T=0.07).with_sizes(image_size=16).T == 0.07  # a value given is kept


def test_the_preset_holds_the_papers_recipe_and_runs(image_folder, tmp_path):
    from simclr_cli.config import preset_path, resolve_pretrain

    cfg = resolve_pretrain(data=None, preset="pirl", sets=None, flags={})
    assert (cfg.train.method, cfg.pirl.negatives, cfg.pirl.momentum, cfg.pirl.T, cfg.pirl.lam) == ("pirl", 32000, 0.5, 0.07, 0.5)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.model.head_layers) == ("sgd", 0.03, 1e-4, 1)
    text = preset_path("pirl").read_text()
    assert "63.6%" in text and "--preset pirl" in text
    result = runner.invoke(app, ["pretrain", str(image_folder), "--preset", "pirl", "--arch", "resnet18", "--width", "0.25",
                                 "--image-size", "16", "--batch-size", "8", "--max-steps", "1", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0", "--set", "pirl.negatives=12",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output


def test_benchmark_measures_pirl_steps(image_folder):
    from test_benchmark import TINY

    result = runner.invoke(app, ["benchmark", str(image_folder), *TINY, "--set", "train.method=pirl", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{"):])
    assert figures["model_images_per_s"] > 0 and figures["baseline_pretrain_images_per_s"] > 0
