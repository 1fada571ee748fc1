"""External encoders: a torchvision or timm ResNet's state dict in a local file, evaluated like our own encoders.

Named on the command line wherever an encoder file goes, as `KIND:ARCH[@SIZE]=PATH`:
- KIND is `torchvision` or `timm` (plain ResNets of both use torchvision's module names; `weights.load_resnet`);
- ARCH one of `model.ARCHS` (width 1, the standard 7x7 stem, no selective kernels);
- SIZE the input side in pixels, default 224;
- PATH a `.safetensors` file, or a `.pt/.pth/.bin/.ckpt` of plain tensors (read with weights_only=True).
The input is each library's ImageNet evaluation transform: resize the short side to SIZE/0.875 (256 at 224) and
centre-crop SIZE (at <= 64 px: resize to SIZE x SIZE), ImageNet mean and std; bilinear for torchvision (its
`ResNet*_Weights` transforms), bicubic for timm (its ResNets' pretrained configs).

An external encoder is only the ResNet: h, the pooled feature, is its one layer. Our model class needs a projection
head, so it carries a one-unit placeholder that nothing reads (`features.check_layer` refuses every head layer of a
model whose config records `EXTERNAL`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from simclr_cli.engine import weights
from simclr_cli.engine.augment import IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from simclr_cli.engine.checkpoint import EncoderInfo
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.model import ARCHS, ModelConfig, SimCLR, build_model

KINDS = {"torchvision": "bilinear", "timm": "bicubic"}  # kind -> the interpolation of its evaluation transform
DEFAULT_IMAGE_SIZE = 224
EXTERNAL = "external"  # the key of EncoderInfo.config that marks an external encoder (and files fine-tuned from one)
SYNTAX = "KIND:ARCH[@SIZE]=PATH, e.g. torchvision:resnet50=resnet50.pth"
_SPEC = re.compile(r"^(?P<kind>[A-Za-z][\w.-]*):(?P<rest>.*)$", re.DOTALL)
_ARCH = re.compile(r"^(?P<arch>[^@=]*)(@(?P<size>[^=]*))?$")


@dataclass(frozen=True)
class ExternalSpec:
    """What `KIND:ARCH[@SIZE]=PATH` names."""

    kind: str
    arch: str
    image_size: int
    path: Path

    @property
    def name(self) -> str:
        """`kind:arch`, with `@size` when it is not the default: what messages and results call the encoder."""
        size = "" if self.image_size == DEFAULT_IMAGE_SIZE else f"@{self.image_size}"
        return f"{self.kind}:{self.arch}{size}"

    def __str__(self) -> str:
        return f"{self.name}={self.path}"


def parse_spec(text: str | Path) -> ExternalSpec | None:
    """The external encoder `text` names, or None when it is a path (an existing file or folder always is, and so
    is anything not starting `word:`); ConfigError naming the part of a spec that is wrong."""
    text = str(text)
    match = _SPEC.match(text)
    if match is None or Path(text).expanduser().exists():
        return None
    kind, rest = match["kind"], match["rest"]
    if kind not in KINDS:
        raise ConfigError(
            f"{text!r} is not a file, and {kind!r} is not an external encoder kind; name a simclr encoder file, "
            f"or a {' or '.join(KINDS)} ResNet as {SYNTAX}"
        )
    model, equals, file = rest.partition("=")
    if not equals or not file:
        raise ConfigError(f"{text!r} names no weights file; write {kind}:{model or 'ARCH'}=PATH")
    parts = _ARCH.match(model)
    if parts is None or parts["arch"] not in ARCHS:
        arch = parts["arch"] if parts is not None else model
        raise ConfigError(f"{kind}:{arch} is not supported; external encoders are ResNets: {', '.join(ARCHS)}")
    size = DEFAULT_IMAGE_SIZE if parts["size"] is None else _image_size(parts["size"], spec=text)
    return ExternalSpec(kind=kind, arch=parts["arch"], image_size=size, path=Path(file).expanduser())


def _image_size(text: str, *, spec: str) -> int:
    if not text.isdigit() or not MIN_IMAGE_SIZE <= int(text) <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"{spec!r}: @{text} is not an input size; use whole pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
            f"(default {DEFAULT_IMAGE_SIZE}, as the ImageNet weights were evaluated)"
        )
    return int(text)


def load(spec: ExternalSpec) -> tuple[SimCLR, EncoderInfo]:
    """The model (eval mode) with the file's weights in its encoder, and the info of its input transform;
    CheckpointError for a missing or unreadable file, or one whose keys do not fit `spec.arch`."""
    model_cfg = ModelConfig(arch=spec.arch, width=1.0, stem="standard", head_layers=1, proj_dim=1, head_output_bn=False)
    with torch.random.fork_rng(devices=[]):  # the init draws are overwritten; the caller's random stream stays
        model = build_model(model_cfg)
    weights.load_resnet(model, spec.path, named=spec.name)
    return model.eval(), info_for(spec, model_cfg)


def info_for(spec: ExternalSpec, model_cfg: ModelConfig) -> EncoderInfo:
    """What the file does not say about itself: the library's evaluation transform, and where the weights came from."""
    source = {**asdict(spec), "path": str(spec.path.resolve()), "name": spec.name}
    return EncoderInfo(model=model_cfg, image_size=spec.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       interpolation=KINDS[spec.kind], config={EXTERNAL: source}, epoch=0, step=0)


def is_external(info: EncoderInfo) -> bool:
    """Whether the encoder is (or was fine-tuned from) an external ResNet: no projection head of its own."""
    return isinstance(info.config, dict) and EXTERNAL in info.config


def name_of(info: EncoderInfo) -> str:
    """`kind:arch` of an external encoder (or of the one a fine-tuned file started from), for messages."""
    return str(info.config[EXTERNAL].get("name", "an external encoder"))


def file_of(checkpoint: Path) -> Path:
    """The file a CHECKPOINT argument names: PATH for a spec, else the argument itself (for default output folders)."""
    spec = parse_spec(checkpoint)
    return Path(checkpoint) if spec is None else spec.path
