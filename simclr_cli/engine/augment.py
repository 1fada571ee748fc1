"""The SimCLR view transform (SimCLR §3, Appendix A) and the evaluation transforms.

Every random draw comes from torch's global RNG (torchvision transforms do this), so a caller can
make a view a pure function of a seed by seeding under `torch.random.fork_rng`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from simclr_cli.engine.errors import ConfigError, is_whole_number

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
SMALL_IMAGE_MAX_SIZE = 64  # CIFAR-size: weaker colour, no blur (SimCLR Appendix B.9)
EVAL_CROP_FRACTION = 0.875  # test time: resize to S / 0.875 (256 at 224), centre-crop S
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024  # one 1024 px view is 12 MB of float32 before the network; SimCLR trains at 224
MAX_COLOR_STRENGTH = 2.5  # hue jitter 0.2*s must stay <= 0.5 (a half turn of the colour wheel)


@dataclass
class AugmentConfig:
    image_size: int = 224  # output side in pixels
    crop_scale: tuple[float, float] = (0.08, 1.0)  # crop area fraction (SimCLR Appendix A)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio
    flip_p: float = 0.5
    color_strength: float | None = None  # s; auto: 1.0 above 64 px, 0.5 at <= 64 px (SimCLR Appendix A, B.9)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float | None = None  # auto: 0.5 above 64 px, 0.0 at <= 64 px (no blur for CIFAR, Appendix B.9)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None  # auto: 10% of image_size, made odd (23 at 224, Appendix A)
    interpolation: str = "bicubic"  # bicubic (official code) | bilinear
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and the fix."""
        if not is_whole_number(self.image_size) or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"augment.image_size {self.image_size!r} is not valid; use a whole number of pixels "
                f">= {MIN_IMAGE_SIZE} and at most {MAX_IMAGE_SIZE} (e.g. 32 for CIFAR, 96 for STL-10, 224 for ImageNet)"
            )
        _check_range("augment.crop_scale", self.crop_scale, high=1.0, example="[0.08, 1.0]")
        _check_range("augment.crop_ratio", self.crop_ratio, high=math.inf, example="[0.75, 1.333]")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if value is None and name == "blur_p":
                continue
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} {value!r} is not a probability; use a number between 0 and 1")
        if self.color_strength is not None and (
            not _is_number(self.color_strength) or not 0.0 <= self.color_strength <= MAX_COLOR_STRENGTH
        ):
            raise ConfigError(
                f"augment.color_strength {self.color_strength!r} is not valid; use a number between 0 and "
                f"{MAX_COLOR_STRENGTH} (SimCLR uses 1.0 for ImageNet, 0.5 for CIFAR), or leave it unset"
            )
        _check_range("augment.blur_sigma", self.blur_sigma, high=math.inf, example="[0.1, 2.0]")
        kernel = self.blur_kernel
        if kernel is not None and (not is_whole_number(kernel) or kernel < 3 or kernel % 2 == 0):
            raise ConfigError(
                f"augment.blur_kernel {self.blur_kernel!r} is not valid; use an odd whole number >= 3 "
                "(e.g. 23 at 224 px), or leave it unset for 10% of image_size"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"augment.interpolation {self.interpolation!r} is not supported; "
                f"choose one of {', '.join(INTERPOLATIONS)}"
            )
        if not _is_triple(self.mean):
            raise ConfigError(f"augment.mean {self.mean!r} is not valid; use three numbers, one per RGB channel")
        if not _is_triple(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(
                f"augment.std {self.std!r} is not valid; use three numbers > 0, one per RGB channel "
                "(e.g. [0.229, 0.224, 0.225], or [1, 1, 1] for no scaling)"
            )

    def resolved(self) -> AugmentConfig:
        """Copy with the size-aware defaults filled in (colour strength, blur probability and kernel)."""
        if not is_whole_number(self.image_size) or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            self.validate()  # raises the image_size message
        small = self.image_size <= SMALL_IMAGE_MAX_SIZE
        color_strength = self.color_strength
        if color_strength is None:
            color_strength = 0.5 if small else 1.0
        blur_p = self.blur_p
        if blur_p is None:
            blur_p = 0.0 if small else 0.5
        blur_kernel = self.blur_kernel
        if blur_kernel is None:
            blur_kernel = default_blur_kernel(self.image_size)
        return dataclasses.replace(self, color_strength=color_strength, blur_p=blur_p, blur_kernel=blur_kernel)


def default_blur_kernel(image_size: int) -> int:
    """10% of the image side, made odd as the official code does (22 -> 23 at 224 px), at least 3."""
    return max(3, (image_size // 10) // 2 * 2 + 1)


def view_transform(cfg: AugmentConfig) -> Callable[[Image.Image], Tensor]:
    """One random SimCLR view (SimCLR Appendix A): PIL image -> (3, S, S) float32, normalised."""
    cfg = cfg.resolved()
    cfg.validate()
    s = cfg.color_strength
    steps: list[Callable] = [
        v2.RandomResizedCrop(
            cfg.image_size,
            scale=cfg.crop_scale,
            ratio=cfg.crop_ratio,
            interpolation=INTERPOLATIONS[cfg.interpolation],
            antialias=True,
        ),
        # Convert once after the crop: the colour ops then run on the small float image, clipped to
        # [0, 1] after each op without re-quantising to 8 bits in between (as the official code does).
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomHorizontalFlip(p=cfg.flip_p),
        # torchvision's ColorJitter applies the four ops in a random order, like the paper's colour distortion.
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.jitter_p),
        v2.RandomGrayscale(p=cfg.grayscale_p),
    ]
    if cfg.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    steps += [v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)), v2.ToPureTensor()]
    return v2.Compose(steps)


class TwoViews:
    """Two independent draws of the SimCLR view transform of one image (SimCLR §2.1)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg.resolved()
        self.transform = view_transform(self.cfg)

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def eval_transform(
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: str = "bicubic",
    crop_fraction: float = EVAL_CROP_FRACTION,
) -> Callable[[Image.Image], Tensor]:
    """Test-time input: resize the short side to S/0.875 and centre-crop S; at <= 64 px just resize to S x S."""
    _check_eval_args(image_size=image_size, mean=mean, std=std, interpolation=interpolation)
    if not _is_number(crop_fraction) or not 0.0 < crop_fraction <= 1.0:
        raise ConfigError(f"crop_fraction {crop_fraction!r} is not valid; use a fraction 0 < f <= 1 (0.875 is standard)")
    mode = INTERPOLATIONS[interpolation]
    if image_size <= SMALL_IMAGE_MAX_SIZE:
        # CIFAR-size images are already the network's input size: cropping would throw away content.
        resize: list[Callable] = [v2.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    else:
        resize = [
            v2.Resize(eval_resize_side(image_size, crop_fraction), interpolation=mode, antialias=True),  # 256 at 224
            v2.CenterCrop(image_size),
        ]
    return v2.Compose([*resize, *_to_normalised_tensor(mean, std)])


def eval_resize_side(image_size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """The short side `eval_transform` resizes to (both sides at <= 64 px): what a reduced decode must still cover."""
    return image_size if image_size <= SMALL_IMAGE_MAX_SIZE else math.floor(image_size / crop_fraction)


def describe_eval_transform(*, image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
                            interpolation: str) -> str:
    """`eval_transform` in words, for a user feeding the network outside simclr (ONNX, torchvision)."""
    size = f"{image_size} x {image_size}"
    if image_size <= SMALL_IMAGE_MAX_SIZE:
        resize = f"resize to {size} ({interpolation})"
    else:
        resize = f"resize the short side to {eval_resize_side(image_size)} ({interpolation}), centre-crop {size}"
    return (f"RGB images, {resize}; scale pixels to [0, 1], then per channel (R, G, B) subtract mean "
            f"{_rounded(mean)} and divide by std {_rounded(std)}; input float32 (B, 3, {image_size}, {image_size}), channels first")


def _rounded(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def train_eval_transform(
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
) -> Callable[[Image.Image], Tensor]:
    """Linear-eval / fine-tune training input: random resized crop + flip only (SimCLR Appendix B.5)."""
    AugmentConfig(image_size=image_size, mean=mean, std=std, interpolation=interpolation, crop_scale=crop_scale,
                  flip_p=flip_p).validate()
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=INTERPOLATIONS[interpolation], antialias=True),
            v2.RandomHorizontalFlip(p=flip_p),
            *_to_normalised_tensor(mean, std),
        ]
    )


def _to_normalised_tensor(mean: tuple[float, float, float], std: tuple[float, float, float]) -> list[Callable]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def _check_eval_args(*, image_size: int, mean: tuple, std: tuple, interpolation: str) -> None:
    AugmentConfig(image_size=image_size, mean=mean, std=std, interpolation=interpolation).validate()


def _check_range(name: str, value: object, *, high: float, example: str) -> None:
    """A (min, max) pair with 0 < min <= max <= high."""
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_number(v) for v in value)
        and 0.0 < value[0] <= value[1] <= high
    )
    if not ok:
        bound = "" if math.isinf(high) else f" <= {high:g}"
        raise ConfigError(f"{name} {value!r} is not a valid range; use two numbers 0 < min <= max{bound}, e.g. {example}")





def _is_number(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= 1e300  # a larger int is no float (math.isfinite would overflow)
    return isinstance(value, float) and math.isfinite(value)


def _is_triple(value: object) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 3 and all(_is_number(v) for v in value)
