"""Tests for the ResNet encoder, projection head and SimCLR module (CPU, tiny inputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.model import (
    ARCHS,
    BasicBlock,
    Bottleneck,
    ModelConfig,
    ProjectionHead,
    ResNet,
    SimCLR,
    build_model,
)




def _non_fc_state(tv_model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tv_model.state_dict().items() if not k.startswith("fc.")}


def _randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BN non-trivial affine params and running stats so eval-mode comparisons mean something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


# ---------------------------------------------------------------------------- output dims


@pytest.mark.parametrize(
    "arch, expected",
    [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048), ("resnet152", 2048)],
)
def test_output_dims(arch: str, expected: int) -> None:
    width = 0.25
    model = build_model(ModelConfig(arch=arch, width=width, proj_dim=16).resolved(image_size=65)).eval()
    assert model.encoder.out_dim == int(expected * width)
    with torch.no_grad():
        h, z = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, int(expected * width))
    assert z.shape == (2, 16)


def test_r50_2x_scales_every_channel_including_stem() -> None:
    encoder = ResNet(arch="resnet50", width=2.0, stem="standard").eval()
    assert encoder.conv1.out_channels == 128
    assert encoder.bn1.num_features == 128
    assert encoder.layer1[0].conv1.out_channels == 128  # torchvision's wide_resnet50_2 keeps 64 here
    assert encoder.out_dim == 4096
    with torch.no_grad():
        h = encoder(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 4096)


# ---------------------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_and_parameter_count_match_torchvision(arch: str) -> None:
    encoder = ResNet(arch=arch, width=1.0, stem="standard")
    tv = getattr(torchvision.models, arch)()
    ours, theirs = encoder.state_dict(), _non_fc_state(tv)
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    n_ours = sum(p.numel() for p in encoder.parameters())
    n_theirs = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert n_ours == n_theirs


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_forward_matches_torchvision_after_loading_its_weights(arch: str) -> None:
    gen = torch.Generator().manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    _randomise_bn(tv, gen)
    tv.fc = nn.Identity()
    encoder = ResNet(arch=arch, width=1.0, stem="standard")
    encoder.load_state_dict(_non_fc_state(tv), strict=True)
    tv.eval()
    encoder.eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = tv(x)  # fc = Identity: avgpool-flattened features
        actual = encoder(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_torchvision_loads_our_state_dict() -> None:
    encoder = ResNet(arch="resnet18", width=1.0, stem="standard")
    result = torchvision.models.resnet18().load_state_dict(encoder.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


# ---------------------------------------------------------------------------- stem


def test_small_stem_keeps_full_resolution() -> None:
    encoder = ResNet(arch="resnet18", width=0.25, stem="small")
    assert encoder.conv1.kernel_size == (3, 3)
    assert encoder.conv1.stride == (1, 1)
    assert encoder.conv1.padding == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)
    seen = {}
    encoder.layer1.register_forward_pre_hook(lambda _m, args: seen.update(shape=args[0].shape))
    with torch.no_grad():
        encoder.eval()(torch.randn(2, 3, 20, 24))
    assert seen["shape"][-2:] == (20, 24)


def test_standard_stem_downsamples_by_four() -> None:
    encoder = ResNet(arch="resnet18", width=0.25, stem="standard")
    assert encoder.conv1.kernel_size == (7, 7)
    assert encoder.conv1.stride == (2, 2)
    assert isinstance(encoder.maxpool, nn.MaxPool2d)
    seen = {}
    encoder.layer1.register_forward_pre_hook(lambda _m, args: seen.update(shape=args[0].shape))
    with torch.no_grad():
        encoder.eval()(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (8, 8)


def test_auto_stem_resolution() -> None:
    cfg = ModelConfig(arch="resnet18")
    assert cfg.resolved(image_size=64).stem == "small"
    assert cfg.resolved(image_size=32).stem == "small"
    assert cfg.resolved(image_size=65).stem == "standard"
    assert cfg.resolved(image_size=224).stem == "standard"
    assert cfg.stem is None  # resolved() returns a copy
    assert ModelConfig(stem="standard").resolved(image_size=32).stem == "standard"  # explicit choice kept
    assert ModelConfig(stem="small").resolved(image_size=224).stem == "small"


def test_simclr_refuses_unresolved_config() -> None:
    with pytest.raises(ValueError, match="resolved"):
        SimCLR(ModelConfig(arch="resnet18", width=0.25))


# ---------------------------------------------------------------------------- init


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_residual_branch_last_bn_gamma_starts_at_zero_when_asked(arch: str) -> None:
    encoder = ResNet(arch=arch, width=0.25, stem="small", zero_init_residual=True)
    blocks = [m for m in encoder.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == (8 if arch == "resnet18" else 16)
    last = "bn2" if arch == "resnet18" else "bn3"
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last).weight) == 0
        # The other BNs (and shortcut BNs) start at gamma = 1.
        assert torch.all(block.bn1.weight == 1)
        if block.downsample is not None:
            assert torch.all(block.downsample[1].weight == 1)
    assert torch.all(encoder.bn1.weight == 1)


def test_default_init_is_torchvision_s() -> None:
    """Every BN gamma starts at 1 and every conv is He-normal (fan_out), as torchvision's ResNet(zero_init_residual=False)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50", width=0.25).resolved(image_size=32))
    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
        if isinstance(module, torch.nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            std = float(module.weight.detach().std())
            # He normal: std = sqrt(2 / fan_out); the sample std of >= 64 draws is within 35% of it
            assert abs(std / (2 / fan_out) ** 0.5 - 1) < 0.35, (name, std)


def test_zero_init_residual_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="zero_init_residual"):
        ModelConfig(zero_init_residual="yes").validate()


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch, head_layers", [("resnet18", 2), ("resnet50", 3)])
def test_every_parameter_gets_a_gradient(arch: str, head_layers: int) -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch=arch, width=0.25, head_layers=head_layers, proj_dim=8).resolved(image_size=16)
    ).train()
    x = torch.randn(4, 3, 16, 16)
    # Fixed random weights: a plain sum of a BN output has zero gradient w.r.t. its input.
    h_weights = torch.randn(4, model.encoder.out_dim)
    z_weights = torch.randn(4, 8)

    def loss_of_batch() -> torch.Tensor:
        h, z = model(x)
        return (h * h_weights).sum() + (z * z_weights).sum()

    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    optimiser.zero_grad()
    loss_of_batch().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # The zero-init gammas get a gradient even at zero, so one step makes every branch live.
    optimiser.step()
    optimiser.zero_grad()
    loss_of_batch().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0, name


# ---------------------------------------------------------------------------- head


@pytest.mark.parametrize("layers", [2, 3])
def test_head_structure(layers: int) -> None:
    head = ProjectionHead(in_dim=32, out_dim=8, layers=layers)
    assert len(head.layers) == layers
    for block in head.layers[:-1]:
        assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
        assert block.linear.bias is None
        assert (block.linear.in_features, block.linear.out_features) == (32, 32)  # hidden width = in_dim
        assert block.bn.weight is not None and block.bn.bias is not None
    last = head.layers[-1]
    assert [type(m) for m in last] == [nn.Linear, nn.BatchNorm1d]
    assert last.linear.bias is None
    assert (last.linear.in_features, last.linear.out_features) == (32, 8)
    assert last.bn.weight is not None
    assert last.bn.bias is None
    assert not any(name.endswith(f"{layers - 1}.bn.bias") for name, _ in head.named_parameters())


@pytest.mark.parametrize("layers", [2, 3])
def test_head_depth(layers: int) -> None:
    head = ProjectionHead(in_dim=32, out_dim=8, layers=layers).train()
    h = torch.randn(4, 32)
    first = head(h, depth=1)
    assert first.shape == (4, 32)
    assert torch.all(first >= 0)  # after the first block's ReLU
    assert head(h).shape == (4, 8)
    assert head(h, depth=layers).shape == (4, 8)
    torch.testing.assert_close(head(h, depth=0), h)
    with pytest.raises(ValueError):
        head(h, depth=layers + 1)


def test_head_last_bn_has_no_shift() -> None:
    """With no bias, the output BN is x_hat * gamma: per-feature batch mean exactly zero in training."""
    head = ProjectionHead(in_dim=16, out_dim=8, layers=2).train()
    with torch.no_grad():
        head.layers[-1].bn.weight.uniform_(0.5, 1.5)
        z = head(torch.randn(6, 16))
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", [2, 3])
def test_head_without_output_bn_ends_in_a_linear_with_a_bias(layers: int) -> None:
    head = ProjectionHead(in_dim=32, out_dim=8, layers=layers, output_bn=False).train()
    last = head.layers[-1]
    assert [type(m) for m in last] == [nn.Linear]
    assert last.linear.bias is not None and (last.linear.in_features, last.linear.out_features) == (32, 8)
    for block in head.layers[:-1]:  # the hidden blocks are unchanged
        assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    h = torch.randn(6, 32)
    with torch.no_grad():
        hidden = h
        for block in head.layers[:-1]:
            hidden = block(hidden)
        torch.testing.assert_close(head(h), hidden @ last.linear.weight.T + last.linear.bias)


def test_head_output_bn_follows_the_image_size() -> None:
    """BN on z (official code) above 64 px; the plain last Linear at <= 64 px (BENCHMARKS.md, "Quality")."""
    cfg = ModelConfig(arch="resnet18")
    assert [cfg.resolved(image_size=s).head_output_bn for s in (16, 32, 64, 65, 224)] == [False, False, False, True, True]
    assert cfg.head_output_bn is None  # resolved() returns a copy
    assert ModelConfig(head_output_bn=True).resolved(image_size=32).head_output_bn is True  # explicit choice kept
    assert ModelConfig(head_output_bn=False).resolved(image_size=224).head_output_bn is False
    assert isinstance(build_model(cfg.resolved(image_size=224)).head.layers[-1].bn, nn.BatchNorm1d)
    assert not hasattr(build_model(cfg.resolved(image_size=32)).head.layers[-1], "bn")


def test_a_model_described_before_the_choice_has_bn_on_z() -> None:
    """Encoder files written before head_output_bn existed have no such key: they were built with BN on z."""
    model = SimCLR(ModelConfig(arch="resnet18", width=0.25, stem="small"))
    assert isinstance(model.head.layers[-1].bn, nn.BatchNorm1d)


def test_head_output_bn_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="head_output_bn"):
        ModelConfig(head_output_bn="no").validate()


# ---------------------------------------------------------------------------- SyncBatchNorm


def test_convert_sync_batchnorm_keeps_head_without_shift() -> None:
    model = build_model(ModelConfig(arch="resnet18", width=0.25, proj_dim=8, head_output_bn=True).resolved(image_size=16))
    names_before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert isinstance(model.head.layers[-1].bn, nn.SyncBatchNorm)
    assert model.head.layers[-1].bn.bias is None
    assert model.head.layers[-1].bn.weight is not None
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == names_before
    # Without a process group SyncBatchNorm falls back to plain batch norm, so CPU forward works.
    h, z = model.train()(torch.randn(4, 3, 16, 16))
    assert h.shape == (4, 128) and z.shape == (4, 8)
    z.sum().backward()


# ---------------------------------------------------------------------------- validation


def test_default_config_is_valid() -> None:
    ModelConfig().validate()
    for arch in ARCHS:
        ModelConfig(arch=arch, width=0.5, stem="small", head_layers=3, proj_dim=1).validate()


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        ({"arch": "resnet19"}, "model.arch 'resnet19'", "resnet50"),
        ({"width": 0}, "model.width 0", "positive whole number"),
        ({"width": -1.0}, "model.width -1.0", "positive whole number"),
        ({"width": 0.3}, "model.width 0.3", "positive whole number"),
        ({"width": float("nan")}, "model.width nan", "positive whole number"),
        ({"width": True}, "model.width True", "positive whole number"),
        ({"stem": "tiny"}, "model.stem 'tiny'", "small, standard"),
        ({"head_layers": 0}, "model.head_layers 0", "use 2"),
        ({"head_layers": 4}, "model.head_layers 4", "use 2"),
        ({"proj_dim": 0}, "model.proj_dim 0", ">= 1"),
        ({"proj_dim": -5}, "model.proj_dim -5", ">= 1"),
    ],
)
def test_validate_rejects_bad_fields(overrides: dict, field: str, fix: str) -> None:
    cfg = ModelConfig(**overrides)
    with pytest.raises(ConfigError) as excinfo:
        cfg.validate()
    message = str(excinfo.value)
    assert field in message
    assert fix in message
    assert "\n" not in message


def test_build_model_validates() -> None:
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(ModelConfig(arch="vgg16", stem="small"))


def test_resolved_rejects_bad_image_size() -> None:
    with pytest.raises(ConfigError, match="image_size 0"):
        ModelConfig().resolved(image_size=0)


def test_a_one_layer_head_is_one_linear_map_as_in_moco_v1():
    cfg = ModelConfig(arch="resnet18", width=0.25, head_layers=1, proj_dim=8, head_output_bn=False).resolved(image_size=16)
    model = build_model(cfg)
    assert [type(m) for m in model.head.layers.modules() if not isinstance(m, nn.Sequential)] == [nn.Linear]
    h, z = model.eval()(torch.zeros(2, 3, 16, 16))
    torch.testing.assert_close(z, model.head.layers[0].linear(h))
