"""engine/defaults.py: where every "auto" value of a pretraining config becomes a number, once."""

from __future__ import annotations

import pytest
import torch

from simclr_cli.engine import defaults
from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.errors import ConfigError, DataError

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_the_data_name_sets_the_image_size_under_the_preset():
    assert defaults.for_data("cifar10") == {"augment": {"image_size": 32}}
    assert defaults.for_data("stl10")["augment"]["image_size"] == 96
    assert defaults.for_data(None)["augment"]["image_size"] == 32  # the digits demo
    assert defaults.for_data("/some/folder")["augment"]["image_size"] == 224


def test_sizes_follow_the_image_size():
    cfg = PretrainConfig()
    cfg.augment.image_size = 32
    resolved = defaults.resolve_sizes(cfg)
    assert resolved.model.stem == "small" and resolved.augment.blur_p == 0.0 and resolved.data.decode_side == 64
    assert cfg.model.stem is None  # a copy: the config given is left as it was


@pytest.mark.parametrize("size, temperature, optimizer", [(32, 0.5, "sgd"), (64, 0.5, "sgd"), (96, 0.1, "lars"), (224, 0.1, "lars")])
def test_temperature_and_optimizer_follow_the_image_size(size, temperature, optimizer):
    """At <= 64 px tau 0.5 (app. B.9) and momentum SGD 0.3 x B/256; above, the ImageNet recipe (tau 0.1, LARS 0.3 x B/256)."""
    cfg = PretrainConfig()
    cfg.augment.image_size = size
    resolved = defaults.resolve_sizes(cfg)
    assert resolved.train.temperature == temperature and (resolved.optim.name, resolved.optim.lr) == (optimizer, 0.3)
    assert cfg.train.temperature is None and cfg.optim.lr is None and cfg.optim.name is None  # the config given is left as it was


def test_square_root_scaling_gets_its_own_base_rate():
    """0.075 x sqrt(B), app. B.1: the same 4.8 peak as 0.3 x B/256 at batch 4096, not 0.3 x 64 = 19.2."""
    from simclr_cli import config
    from simclr_cli.engine.optim import scaled_lr

    cfg = defaults.resolve_sizes(config.resolve_pretrain(data="imagenet", preset="imagenet", sets=None,
                                                         flags={"optim.lr_scaling": "sqrt"}))
    assert cfg.optim.lr == 0.075
    assert scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling) == pytest.approx(4.8)
    linear = defaults.resolve_sizes(config.resolve_pretrain(data="imagenet", preset="imagenet", sets=None, flags={}))
    assert scaled_lr(linear.optim.lr, linear.train.batch_size, linear.optim.lr_scaling) == pytest.approx(4.8)


def test_values_given_are_kept():
    cfg = PretrainConfig()
    cfg.augment.image_size = 32
    cfg.train.temperature, cfg.optim.lr, cfg.optim.lr_scaling = 0.2, 0.6, "sqrt"
    resolved = defaults.resolve_sizes(cfg)
    assert resolved.train.temperature == 0.2 and resolved.optim.lr == 0.6


def test_the_batch_follows_the_machine_the_processes_and_the_data():
    cfg = PretrainConfig()
    assert defaults.resolve_pretrain(cfg, device=CPU, world_size=1, num_images=1000).train.batch_size == 64
    assert defaults.resolve_pretrain(cfg, device=GPU, world_size=1, num_images=1000).train.batch_size == 256
    assert defaults.resolve_pretrain(cfg, device=CPU, world_size=3, num_images=100).train.batch_size == 99  # split evenly
    assert defaults.resolve_pretrain(cfg, device=CPU, world_size=1, num_images=10).train.batch_size == 10  # at most the data


def test_a_batch_that_cannot_work_fails_before_anything_runs():
    cfg = PretrainConfig()
    with pytest.raises(DataError, match="SimCLR needs at least 2 per batch"):
        defaults.resolve_pretrain(cfg, device=CPU, world_size=1, num_images=1)
    cfg.train.batch_size = 64
    with pytest.raises(DataError, match="--batch-size 64 is larger than the dataset"):
        defaults.resolve_pretrain(cfg, device=CPU, world_size=1, num_images=10)
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        defaults.resolve_pretrain(cfg, device=CPU, world_size=3, num_images=100)


def test_workers_are_the_ones_asked_for_or_the_machines(monkeypatch):
    monkeypatch.setattr(defaults, "available_cpus", lambda: 8)
    assert defaults.resolve_workers(3, CPU) == 3
    assert defaults.resolve_workers(None, CPU) == 4  # decoding on a CPU: half the cores, at most 4
    assert defaults.resolve_workers(None, CPU, decoding=False) == 0  # cached pixels: a batch is a copy
    assert defaults.resolve_workers(None, GPU, decoding=False) == 2
    monkeypatch.setattr(defaults, "available_cpus", lambda: 2)
    assert defaults.resolve_workers(None, CPU) == 0  # a small CPU machine gives its cores to the model
