"""The SimCLR network: a width-scaled ResNet encoder f and a projection head g (SimCLR §2.1, §B.9), optionally with
SimCLRv2's selective kernels (v2 §2; the official `tf2/resnet.py`: `SK_Conv2D`, the ResNet-D stem and shortcut).

Pure modules: no devices, dtypes, files or environment; the caller places and casts them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_cli.engine.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEMS = ("small", "standard")
HEAD_LAYERS = (1, 2, 3)  # 1: one Linear (MoCo v1), 2: SimCLR v1, 3: SimCLRv2
SMALL_STEM_MAX_IMAGE_SIZE = 64  # CIFAR-size inputs lose too much to a 7x7 s2 conv + max-pool (SimCLR §B.9)
# Upper bounds that keep a typo from asking for terabytes: the paper's largest model is R50 (4x), its z 128-d.
MAX_WIDTH = 64
MAX_PROJ_DIM = 16384
SK_MIN_DIM = 32  # the attention bottleneck is never narrower than this (official SK_Conv2D's min_dim)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    width: float = 1.0  # multiplies EVERY channel count (SimCLR "R50 2x", §B.1); 64*width must be whole
    stem: str | None = None  # None = auto from the image size; "small" (3x3 s1, no max-pool) or "standard"
    head_layers: int = 2  # 2 = SimCLR v1 head, 3 = SimCLRv2 head (v2 §2), 1 = a linear head (MoCo v1)
    proj_dim: int = 128  # z dimension (SimCLR §B.4)
    # Start each residual branch's last BN gamma at 0 (official SimCLR code, Goyal et al. 2017). Off by default:
    # with it, runs of a few hundred steps barely move the residual branches (BENCHMARKS.md, "Quality").
    zero_init_residual: bool = False
    # BN (scale, no shift) on z, as in the official code; None = auto: on above 64 px, off at <= 64 px, where
    # the common Linear-BN-ReLU-Linear head trained better encoders in short runs (BENCHMARKS.md, "Quality").
    head_output_bn: bool | None = None
    # Selective kernels (SimCLRv2 §2): 0 = off; the paper's SK models use 0.0625. With SK on, every 3x3 conv that
    # carries a block's stride has two branches, the standard stem is ResNet-D's three 3x3 convs and the
    # projection shortcuts average-pool before their 1x1 conv (official code).
    sk_ratio: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and the fix."""
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch {self.arch!r} is not supported; choose one of {', '.join(ARCHS)}")
        if not _is_valid_width(self.width):
            raise ConfigError(
                f"model.width {self.width!r} is not valid; 64*width must be a positive whole number "
                "(e.g. 0.25, 0.5, 1, 2, 4)"
            )
        if self.width > MAX_WIDTH:
            raise ConfigError(f"model.width {self.width!r} is not valid; use at most {MAX_WIDTH} (SimCLR's widest is 4)")
        if self.stem is not None and self.stem not in STEMS:
            raise ConfigError(
                f"model.stem {self.stem!r} is not supported; choose one of {', '.join(STEMS)} "
                "(or leave it unset to pick from the image size)"
            )
        if isinstance(self.head_layers, bool) or self.head_layers not in HEAD_LAYERS:
            raise ConfigError(
                f"model.head_layers {self.head_layers!r} is not supported; use 2 (SimCLR v1 head), 3 (SimCLRv2 head) "
                "or 1 (a linear head, MoCo v1)"
            )
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or not 1 <= self.proj_dim <= MAX_PROJ_DIM:
            raise ConfigError(
                f"model.proj_dim {self.proj_dim!r} is not valid; use a whole number >= 1 and at most {MAX_PROJ_DIM} (SimCLR uses 128)"
            )
        if isinstance(self.sk_ratio, bool) or not isinstance(self.sk_ratio, (int, float)) or not (
            math.isfinite(self.sk_ratio) and 0 <= self.sk_ratio <= 1
        ):
            raise ConfigError(
                f"model.sk_ratio {self.sk_ratio!r} is not valid; use 0 (no selective kernels) or a fraction up to 1 "
                "(SimCLRv2's SK models use 0.0625)"
            )
        if not isinstance(self.zero_init_residual, bool):
            raise ConfigError(
                f"model.zero_init_residual {self.zero_init_residual!r} is not valid; use true (the official code's "
                "init) or false (torchvision's, the default)"
            )
        if self.head_output_bn is not None and not isinstance(self.head_output_bn, bool):
            raise ConfigError(
                f"model.head_output_bn {self.head_output_bn!r} is not valid; use true (BN on z, the official code), "
                "false (a plain last Linear with a bias) or leave it unset to pick from the image size"
            )

    def resolved(self, *, image_size: int) -> ModelConfig:
        """Copy with stem and head_output_bn filled in: small stem and no BN on z when image_size <= 64 px."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size {image_size!r} is not valid; use a whole number of pixels >= 1")
        stem = self.stem
        if stem is None:
            stem = "small" if image_size <= SMALL_STEM_MAX_IMAGE_SIZE else "standard"
        output_bn = self.head_output_bn
        if output_bn is None:
            output_bn = image_size > SMALL_STEM_MAX_IMAGE_SIZE
        return dataclasses.replace(self, stem=stem, head_output_bn=output_bn)


def _is_valid_width(width: object) -> bool:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or abs(width) > 1e300:  # no float holds it
        return False
    channels = 64 * width
    return math.isfinite(channels) and channels >= 1 and float(channels).is_integer()


class StridedConv3x3(nn.Conv2d):
    """A 3x3 conv with stride > 1 (padding 1) that, in bf16 on the CPU, runs with stride 1 on a 1 x 1 map, where both
    give the same 1 x 1 output from the same centre tap. PyTorch 2.14's CPU bf16 conv (oneDNN, AVX512-BF16/AMX)
    returns a garbage weight gradient (|g| up to 1e30, or inf) for the strided conv on a 1 x 1 map: PIRL's 4 px
    jigsaw tiles of 16 px views reach layer4 at 1 x 1, and the demo's loss became non-finite (pytorch/pytorch#169688
    reports its kin). Other precisions and devices keep the strided kernel, so their numbers do not move."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if x.shape[-2:] == (1, 1) and x.device.type == "cpu" and _bf16(x):
            return F.conv2d(x, weight, bias, 1, self.padding, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def _bf16(x: Tensor) -> bool:
    """Whether a conv on x computes in bf16: x is bf16, or autocast to bf16 is on for its device."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    conv = StridedConv3x3 if stride > 1 else nn.Conv2d
    return conv(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class SelectiveKernel(nn.Module):
    """SimCLRv2's selective-kernel conv (official `SK_Conv2D`, after Li et al. 2019): two 3x3 branches, computed as
    one conv to 2C channels + BN + ReLU, mixed per channel by a softmax over the branches of attention logits computed
    from their spatially pooled sum through a 1x1 bottleneck of max(int(C * sk_ratio), 32) channels (+ BN + ReLU).
    Both branches are plain 3x3 convs, as in the official code (the SKNet paper's second branch is dilated)."""

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1, sk_ratio: float):
        super().__init__()
        if not sk_ratio > 0:
            raise ValueError(f"sk_ratio {sk_ratio!r} must be > 0")
        mid = max(int(planes * sk_ratio), SK_MIN_DIM)
        self.planes = planes
        self.conv = _conv3x3(in_planes, 2 * planes, stride)
        self.bn = nn.BatchNorm2d(2 * planes)
        self.attn_reduce = _conv1x1(planes, mid)
        self.attn_bn = nn.BatchNorm2d(mid)
        self.attn_expand = _conv1x1(mid, 2 * planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        branches = self.relu(self.bn(self.conv(x))).unflatten(1, (2, self.planes))  # (B, 2, C, H, W)
        pooled = branches.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        logits = self.attn_expand(self.relu(self.attn_bn(self.attn_reduce(pooled))))  # (B, 2C, 1, 1)
        attention = logits.unflatten(1, (2, self.planes)).softmax(dim=1)  # (B, 2, C, 1, 1), sums to 1 over branches
        return (branches * attention).sum(dim=1)  # (B, C, H, W)


class AvgDown(nn.Module):
    """The 2x2 average pool of a ResNet-D shortcut as the official code computes it: stride 2 pools the input padded
    with one zero row and column at the end (FixedPadding(2) + VALID); stride 1 is TensorFlow's 'SAME' pool, whose
    padding is left out of the mean."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=self.stride)  # (B, C, H/s, W/s)
        if self.stride > 1:
            return pooled
        ones = F.pad(torch.ones_like(x[:1, :1]), (0, 1, 0, 1))  # (1, 1, H+1, W+1): 1 where x has a value
        return pooled / F.avg_pool2d(ones, kernel_size=2, stride=1)  # the mean over the cells inside x only


def _downsample(in_planes: int, out_planes: int, *, stride: int, resnet_d: bool) -> nn.Sequential:
    """The projection shortcut: a strided 1x1 conv + BN, or with SK ResNet-D's pool + 1x1 conv + BN (timm's names)."""
    if resnet_d:
        return nn.Sequential(AvgDown(stride), _conv1x1(in_planes, out_planes), nn.BatchNorm2d(out_planes))
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as in torchvision (ResNet-18/34). With SK the
    first conv (the one with the stride) is selective, as in timm's skresnet18/34: the official code has no SK here."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 sk_ratio: float = 0.0):
        super().__init__()
        self.conv1: nn.Module = (
            SelectiveKernel(inplanes, planes, stride=stride, sk_ratio=sk_ratio) if sk_ratio > 0
            else _conv3x3(inplanes, planes, stride)
        )
        self.bn1 = None if sk_ratio > 0 else nn.BatchNorm2d(planes)  # SK has its own BN + ReLU before the mixing
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.relu(self.bn1(out))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, torchvision "ResNet v1.5") -> 1x1 x4, for ResNet-50/101/152. With SK the 3x3 is
    a SelectiveKernel (official BottleneckBlock)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 sk_ratio: float = 0.0):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2: nn.Module = (
            SelectiveKernel(planes, planes, stride=stride, sk_ratio=sk_ratio) if sk_ratio > 0
            else _conv3x3(planes, planes, stride)
        )
        self.bn2 = None if sk_ratio > 0 else nn.BatchNorm2d(planes)  # SK has its own BN + ReLU before the mixing
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.bn2 is not None:
            out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet encoder f without fc; module names match torchvision so width-1 weights load both ways. With SK (sk_ratio
    > 0) the names follow timm's ResNet-D (conv1.0/.3/.6 deep stem, downsample.1/.2 after the pool)."""

    def __init__(self, *, arch: str, width: float = 1.0, stem: str = "standard", zero_init_residual: bool = False,
                 sk_ratio: float = 0.0):
        super().__init__()
        if arch not in _SPECS:
            raise ValueError(f"arch {arch!r} is not one of {ARCHS}")
        if not _is_valid_width(width):
            raise ValueError(f"width {width!r}: 64*width must be a positive whole number")
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r} is not one of {STEMS}")
        if not 0 <= sk_ratio <= 1:
            raise ValueError(f"sk_ratio {sk_ratio!r} must be in [0, 1]")
        self.sk_ratio = sk_ratio
        block, depths = _SPECS[arch]
        base = int(64 * width)  # the stem is scaled too: R50 2x has a 128-channel stem (SimCLR §B.1)

        if stem == "small":
            # CIFAR stem (SimCLR §B.9): keep full resolution; Identity keeps torchvision's module names.
            self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif sk_ratio > 0:
            # ResNet-D stem (official code with SK): three 3x3 convs, the first strided, half width for the first two
            half = max(base // 2, 1)
            self.conv1 = nn.Sequential(
                _conv3x3(3, half, stride=2), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                _conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                _conv3x3(half, base),
            )
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)

        self.inplanes = base
        self.layer1 = self._make_layer(block, base, depths[0], stride=1)
        self.layer2 = self._make_layer(block, base * 2, depths[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, depths[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = base * 8 * block.expansion  # 512*width (18/34) or 2048*width (50+)
        # channels out of the stem (after the max-pool) and each stage: the widths of the maps a hook reads
        self.stage_dims = {"stem": base, **{f"layer{i}": base * 2 ** (i - 1) * block.expansion for i in range(1, 5)}}

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual block starts as the identity (Goyal et al. 2017; SimCLR official code)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, *, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _downsample(self.inplanes, planes * block.expansion, stride=stride, resnet_d=self.sk_ratio > 0)
        layers = [block(self.inplanes, planes, stride=stride, downsample=downsample, sk_ratio=self.sk_ratio)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, sk_ratio=self.sk_ratio) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64w, H/4, W/4); small stem: (B, 64w, H, W)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)  # (B, out_dim, H', W')
        return torch.flatten(self.avgpool(x), 1)  # h: (B, out_dim)


class ProjectionHead(nn.Module):
    """g: (layers-1) x [Linear -> BN -> ReLU], then Linear -> BN without shift (SimCLR §B.9, v2 §2), or with
    `output_bn=False` a last Linear with a bias and no BN (the common Linear-BN-ReLU-Linear head)."""

    def __init__(self, *, in_dim: int, out_dim: int, layers: int = 2, output_bn: bool = True):
        super().__init__()
        if layers not in HEAD_LAYERS:
            raise ValueError(f"layers {layers!r} is not one of {HEAD_LAYERS}")
        # Linear layers have no bias: the BN right after makes it redundant (official SimCLR code).
        blocks = [
            nn.Sequential(
                OrderedDict(
                    linear=nn.Linear(in_dim, in_dim, bias=False),  # hidden width = encoder width
                    bn=nn.BatchNorm1d(in_dim),
                    relu=nn.ReLU(inplace=True),
                )
            )
            for _ in range(layers - 1)
        ]
        if output_bn:
            last_bn = nn.BatchNorm1d(out_dim)
            # Official code: scale but no shift on the output BN; F.batch_norm accepts a None bias.
            last_bn.register_parameter("bias", None)
            blocks.append(nn.Sequential(OrderedDict(linear=nn.Linear(in_dim, out_dim, bias=False), bn=last_bn)))
        else:
            blocks.append(nn.Sequential(OrderedDict(linear=nn.Linear(in_dim, out_dim))))
        self.layers = nn.Sequential(*blocks)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, h: Tensor, *, depth: int | None = None) -> Tensor:
        """Output after the first `depth` blocks (None = all); depth=1 feeds v2 fine-tuning (v2 §2)."""
        if depth is None:
            depth = len(self.layers)
        if isinstance(depth, bool) or not 0 <= depth <= len(self.layers):
            raise ValueError(f"depth {depth!r} must be between 0 and {len(self.layers)}")
        for block in self.layers[:depth]:
            h = block(h)  # (B, in_dim) for hidden blocks, (B, out_dim) after the last
        return h


class SimCLR(nn.Module):
    """Encoder f and head g; both views go through in one batch so BN sees all 2N views (SimCLR §2.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.stem is None:
            raise ValueError("ModelConfig.stem is None; pass cfg.resolved(image_size=...) to SimCLR")
        output_bn = True if cfg.head_output_bn is None else cfg.head_output_bn  # None: a file from before the choice
        self.cfg = cfg
        self.encoder = ResNet(arch=cfg.arch, width=cfg.width, stem=cfg.stem, zero_init_residual=cfg.zero_init_residual,
                              sk_ratio=cfg.sk_ratio)
        self.head = ProjectionHead(in_dim=self.encoder.out_dim, out_dim=cfg.proj_dim, layers=cfg.head_layers,
                                   output_bn=output_bn)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)  # (B, out_dim)
        z = self.head(h)  # (B, proj_dim)
        return h, z


def build_model(cfg: ModelConfig) -> SimCLR:
    """SimCLR model from a validated, resolved config."""
    return SimCLR(cfg)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters and buffers of the model `cfg` describes, counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))
