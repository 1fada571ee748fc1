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
        ({"sk_ratio": -0.1}, "model.sk_ratio -0.1", "0.0625"),
        ({"sk_ratio": 2}, "model.sk_ratio 2", "0.0625"),
        ({"sk_ratio": float("nan")}, "model.sk_ratio nan", "0.0625"),
        ({"sk_ratio": True}, "model.sk_ratio True", "0.0625"),
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


# ---------------------------------------------------------------------------- selective kernels (SimCLRv2)

# Parameter counts of the official SimCLRv2 models, in millions, from the "Param (M)" column of the table in
# google-research/simclr README.md ("Pre-trained models for SimCLRv2", = SimCLRv2 paper Table 1): the ResNet without
# its linear classifier, rounded to the nearest million. The table's two R152 2x rows (233, 354) are left out:
# they sit 0.6-0.75 M above the count of the very network its R152 1x and 3x rows agree with.
OFFICIAL_PARAMS_M = [
    ("resnet50", 1, 0.0, 24),  # r50_1x_sk0
    ("resnet50", 1, 0.0625, 35),  # r50_1x_sk1
    ("resnet50", 2, 0.0, 94),
    ("resnet50", 2, 0.0625, 140),
    ("resnet101", 1, 0.0, 43),
    ("resnet101", 1, 0.0625, 65),
    ("resnet101", 2, 0.0625, 257),
    ("resnet152", 1, 0.0, 58),
    ("resnet152", 1, 0.0625, 89),
    ("resnet152", 3, 0.0625, 795),  # r152_3x_sk1
]


@pytest.mark.parametrize("arch, width, sk_ratio, millions", OFFICIAL_PARAMS_M)
def test_parameter_counts_match_the_official_simclrv2_family(arch, width, sk_ratio, millions) -> None:
    with torch.device("meta"):  # r152 3x is 795 M parameters: count them without allocating 3 GB
        encoder = ResNet(arch=arch, width=width, stem="standard", sk_ratio=sk_ratio)
    count = sum(p.numel() for p in encoder.parameters())
    assert abs(count / 1e6 - millions) <= 0.5, count


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BN in eval mode from its formula, on a (C, ...) tensor of one image."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def test_selective_kernel_matches_a_naive_single_image_reference() -> None:
    from simclr_cli.engine.model import SelectiveKernel

    torch.manual_seed(0)
    in_planes, planes = 6, 5
    sk = SelectiveKernel(in_planes, planes, stride=2, sk_ratio=0.0625)
    _randomise_bn(sk, torch.Generator().manual_seed(1))
    sk.eval()
    x = torch.randn(3, in_planes, 9, 9)
    with torch.no_grad():
        got = sk(x)
        assert sk.attn_reduce.out_channels == 32  # max(int(5 * 0.0625), 32): the official floor
        for i in range(len(x)):
            image = x[i : i + 1]
            weight = sk.conv.weight  # (2C, in, 3, 3): branch 0 is the first C output channels, branch 1 the rest
            bn_out = _bn_eval(torch.nn.functional.conv2d(image, weight, stride=2, padding=1)[0], sk.bn)
            a, b = torch.relu(bn_out[:planes]), torch.relu(bn_out[planes:])  # the two branches, (C, 5, 5) each
            s = torch.stack([(a[c] + b[c]).mean() for c in range(planes)])  # pooled sum, (C,)
            z = torch.relu(_bn_eval(sk.attn_reduce.weight[:, :, 0, 0] @ s, sk.attn_bn))  # (32,)
            logits = sk.attn_expand.weight[:, :, 0, 0] @ z  # (2C,)
            expected = torch.empty_like(a)
            for c in range(planes):  # softmax over the two branches, channel by channel
                pa, pb = torch.softmax(torch.stack([logits[c], logits[planes + c]]), dim=0)
                expected[c] = pa * a[c] + pb * b[c]
            torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [6, 7])
def test_avg_down_pools_as_the_official_code(stride: int, size: int) -> None:
    """stride 2: FixedPadding(2) (one zero row/column at the end) then a VALID 2x2 pool; stride 1: TensorFlow's
    'SAME' 2x2 pool, which averages only the cells inside the image."""
    from simclr_cli.engine.model import AvgDown

    x = torch.randn(2, 3, size, size)
    got = AvgDown(stride)(x)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    out = (size + 1 - 2) // stride + 1 if stride == 2 else size
    expected = torch.empty(2, 3, out, out)
    for i in range(out):
        for j in range(out):
            r, c = i * stride, j * stride
            if stride == 2:
                expected[:, :, i, j] = padded[:, :, r : r + 2, c : c + 2].mean(dim=(2, 3))
            else:
                expected[:, :, i, j] = x[:, :, r : r + 2, c : c + 2].mean(dim=(2, 3))  # slicing stops at the edge
    torch.testing.assert_close(got, expected)


def test_sk_standard_stem_is_resnet_d_and_shortcuts_pool() -> None:
    encoder = ResNet(arch="resnet50", width=0.5, stem="standard", sk_ratio=0.0625)
    convs = [m for m in encoder.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 16, (3, 3), (2, 2)), (16, 16, (3, 3), (1, 1)), (16, 32, (3, 3), (1, 1)),
    ]
    assert isinstance(encoder.maxpool, nn.MaxPool2d)
    shortcut = encoder.layer2[0].downsample
    assert shortcut[0].stride == 2 and shortcut[1].stride == (1, 1) and shortcut[1].kernel_size == (1, 1)
    assert set(encoder.layer2[0].conv2.state_dict()) >= {"conv.weight", "attn_reduce.weight", "attn_expand.weight"}
    assert encoder.layer2[0].bn2 is None  # SK carries its own BN + ReLU


def test_sk_small_stem_stays_a_single_3x3_conv() -> None:
    """The official cifar_stem ignores sk_ratio: 3x3 stride 1, no max-pool."""
    encoder = ResNet(arch="resnet18", width=0.25, stem="small", sk_ratio=0.0625)
    assert isinstance(encoder.conv1, nn.Conv2d) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.layer1[0].conv1, nn.Module) and hasattr(encoder.layer1[0].conv1, "attn_reduce")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem, size", [("small", 16), ("standard", 33)])
def test_sk_models_run_and_every_parameter_gets_a_gradient(arch: str, stem: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, width=0.25, stem=stem, sk_ratio=0.0625, proj_dim=8))
    h, z = model(torch.randn(3, 3, size, size))
    assert h.shape == (3, model.encoder.out_dim) and z.shape == (3, 8)
    z.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_sk_zero_init_residual_zeroes_each_block_s_last_bn() -> None:
    encoder = ResNet(arch="resnet50", width=0.25, stem="small", sk_ratio=0.0625, zero_init_residual=True)
    assert all(not block.bn3.weight.any() for layer in (encoder.layer1, encoder.layer4) for block in layer)
def test_a_one_layer_head_is_one_linear_map_as_in_moco_v1():
    cfg = ModelConfig(arch="resnet18", width=0.25, head_layers=1, proj_dim=8, head_output_bn=False).resolved(image_size=16)
    model = build_model(cfg)
    assert [type(m) for m in model.head.layers.modules() if not isinstance(m, nn.Sequential)] == [nn.Linear]
    h, z = model.eval()(torch.zeros(2, 3, 16, 16))
    torch.testing.assert_close(z, model.head.layers[0].linear(h))


# ---------------------------------------------------------------------------- strided convs on 1 x 1 maps


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_a_strided_conv_on_a_1x1_map_gets_the_float64_reference_gradient(precision) -> None:
    """PIRL's 4 px tiles reach layer4's strided 3x3 conv at 1 x 1; CPU bf16 (oneDNN) gave it a garbage weight
    gradient there (up to 1e30), which made the demo's loss non-finite. Reference: the centre tap, in float64."""
    torch.manual_seed(0)
    conv = ResNet(arch="resnet18", width=0.25, stem="small").layer4[0].conv1  # 64 -> 128 channels, stride 2
    assert conv.stride == (2, 2)
    for _ in range(5):  # the bad kernel's output is whatever memory held: several draws, so one lucky one cannot pass
        x = torch.randn(64, conv.in_channels, 1, 1)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            y = conv(x.contiguous(memory_format=torch.channels_last))  # (64, 128, 1, 1)
        dy = torch.randn(y.shape, dtype=torch.float64)
        (y.double() * dy).sum().backward()
        centre = conv.weight.detach().double()[:, :, 1, 1]  # (out, in): the only tap a 1 x 1 map meets
        y_ref = torch.einsum("oi,bi->bo", centre, x.double()[:, :, 0, 0])
        grad_ref = torch.zeros_like(conv.weight, dtype=torch.float64)
        grad_ref[:, :, 1, 1] = torch.einsum("bo,bi->oi", dy[:, :, 0, 0], x.double()[:, :, 0, 0])
        tolerance = 0.02 if precision == torch.bfloat16 else 1e-5
        assert y.shape == (64, conv.out_channels, 1, 1)
        assert torch.allclose(y.double()[:, :, 0, 0], y_ref, rtol=tolerance, atol=tolerance * y_ref.abs().max())
        error = (conv.weight.grad.double() - grad_ref).norm() / grad_ref.norm()
        assert error < tolerance
