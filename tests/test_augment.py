"""Tests for the SimCLR view transform and the evaluation transforms (CPU, small generated images)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from simclr_cli.engine.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    TwoViews,
    eval_transform,
    train_eval_transform,
    view_transform,
)
from simclr_cli.engine.errors import ConfigError

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: outputs are pixel values in [0, 1]
NO_COLOUR = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
WHOLE_IMAGE = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}  # on a square image: the crop is the image




def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def constant_image(size: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def half_and_half(size: int) -> Image.Image:
    """Black left half, white right half: a horizontal flip is visible in the first column."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, size // 2 :] = 255
    return Image.fromarray(pixels)


def pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def transforms_of(transform) -> list:
    return list(transform.transforms)


@pytest.mark.parametrize("image_size", [32, 224])
def test_view_shape_dtype_and_normalisation(image_size):
    transform = view_transform(AugmentConfig(image_size=image_size))
    view = transform(random_image(50, 70))
    assert type(view) is torch.Tensor
    assert view.shape == (3, image_size, image_size)
    assert view.dtype == torch.float32
    # A normalised [0, 1] image lies within [(0 - mean) / std, (1 - mean) / std] per channel.
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert (view >= -mean / std - 1e-5).all() and (view <= (1 - mean) / std + 1e-5).all()


def test_two_views_differ():
    torch.manual_seed(0)
    v1, v2_ = TwoViews(AugmentConfig(image_size=32))(random_image(40, 40))
    assert v1.shape == v2_.shape == (3, 32, 32)
    assert not torch.equal(v1, v2_)


def test_views_are_a_function_of_the_seed():
    views = TwoViews(AugmentConfig(image_size=32))
    img = random_image(48, 40)

    def draw(seed):
        torch.manual_seed(seed)
        return views(img)

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_auto_defaults_small_images():
    cfg = AugmentConfig(image_size=32)
    resolved = cfg.resolved()
    assert resolved.color_strength == 0.5 and resolved.blur_p == 0.0
    assert cfg.color_strength is None and cfg.blur_p is None and cfg.blur_kernel is None  # not mutated
    steps = transforms_of(view_transform(cfg))
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur) for t in steps)
    (jitter,) = [t.transforms[0] for t in steps if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter)]
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))


def test_auto_defaults_imagenet_size():
    resolved = AugmentConfig(image_size=224).resolved()
    assert resolved.color_strength == 1.0 and resolved.blur_p == 0.5 and resolved.blur_kernel == 23
    steps = transforms_of(view_transform(AugmentConfig(image_size=224)))
    (blur,) = [t for t in steps if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)]
    assert blur.p == 0.5 and list(blur.transforms[0].kernel_size) == [23, 23]
    (jitter,) = [t for t in steps if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter)]
    assert jitter.p == 0.8
    assert jitter.transforms[0].saturation == pytest.approx((0.2, 1.8))
    assert jitter.transforms[0].hue == pytest.approx((-0.2, 0.2))


@pytest.mark.parametrize(("image_size", "small", "kernel"), [(8, True, 3), (64, True, 7), (65, False, 7), (96, False, 9)])
def test_auto_defaults_boundary(image_size, small, kernel):
    resolved = AugmentConfig(image_size=image_size).resolved()
    assert (resolved.color_strength, resolved.blur_p) == ((0.5, 0.0) if small else (1.0, 0.5))
    assert resolved.blur_kernel == kernel and resolved.blur_kernel % 2 == 1


def test_explicit_values_beat_auto_defaults():
    resolved = AugmentConfig(image_size=32, color_strength=0.25, blur_p=0.3, blur_kernel=5).resolved()
    assert (resolved.color_strength, resolved.blur_p, resolved.blur_kernel) == (0.25, 0.3, 5)
    assert dataclasses.replace(resolved) == resolved.resolved()


def first_column_is_white(view: torch.Tensor) -> bool:
    return bool(view[:, :, 0].mean() > 0.5)


@pytest.mark.parametrize(("flip_p", "expected_flips"), [(0.0, 0), (1.0, 40)])
def test_flip_probability_extremes(flip_p, expected_flips):
    transform = view_transform(AugmentConfig(image_size=16, flip_p=flip_p, **WHOLE_IMAGE, **NO_COLOUR, **RAW))
    torch.manual_seed(0)
    flips = sum(first_column_is_white(transform(half_and_half(16))) for _ in range(40))
    assert flips == expected_flips


def test_flip_probability_half():
    transform = view_transform(AugmentConfig(image_size=16, flip_p=0.5, **WHOLE_IMAGE, **NO_COLOUR, **RAW))
    torch.manual_seed(0)
    flips = sum(first_column_is_white(transform(half_and_half(16))) for _ in range(400))
    assert 150 <= flips <= 250  # Binomial(400, 0.5): mean 200, sd 10


def is_grey(view: torch.Tensor) -> bool:
    return bool(torch.allclose(view[0], view[1], atol=1e-6) and torch.allclose(view[1], view[2], atol=1e-6))


@pytest.mark.parametrize("jitter_p", [0.0, 1.0])
def test_grayscale_always_gives_equal_channels(jitter_p):
    transform = view_transform(AugmentConfig(image_size=16, grayscale_p=1.0, jitter_p=jitter_p, **RAW))
    torch.manual_seed(0)
    assert all(is_grey(transform(random_image(24, 24, seed))) for seed in range(10))


def test_grayscale_probability():
    transform = view_transform(AugmentConfig(image_size=8, grayscale_p=0.2, jitter_p=0.0, **WHOLE_IMAGE, **RAW))
    torch.manual_seed(0)
    greys = sum(is_grey(transform(constant_image(8, (200, 40, 90)))) for _ in range(500))
    assert 65 <= greys <= 135  # Binomial(500, 0.2): mean 100, sd 9


def test_no_jitter_no_grayscale_keeps_colours():
    rgb = (200, 40, 90)
    transform = view_transform(AugmentConfig(image_size=32, jitter_p=0.0, grayscale_p=0.0, **RAW))
    torch.manual_seed(0)
    expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255
    for _ in range(10):
        view = transform(constant_image(40, rgb))
        assert torch.allclose(view, expected.expand_as(view), atol=1 / 255)


def test_jitter_probability():
    rgb = (200, 40, 90)
    expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255

    def changed_fraction(jitter_p, draws):
        transform = view_transform(AugmentConfig(image_size=8, jitter_p=jitter_p, grayscale_p=0.0, **RAW))
        torch.manual_seed(0)
        return sum(not torch.allclose(transform(constant_image(8, rgb)), expected, atol=2 / 255) for _ in range(draws)) / draws

    assert changed_fraction(0.0, 50) == 0.0
    assert changed_fraction(1.0, 50) >= 0.95
    assert 0.68 <= changed_fraction(0.8, 400) <= 0.90  # mean 0.8, sd 0.02


def test_normalisation_uses_mean_and_std():
    rgb = (200, 40, 90)
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.2, 0.3)
    transform = view_transform(AugmentConfig(image_size=16, mean=mean, std=std, **NO_COLOUR))
    view = transform(constant_image(20, rgb))
    for c in range(3):
        assert torch.allclose(view[c], torch.full((16, 16), (rgb[c] / 255 - mean[c]) / std[c]), atol=1e-2)


def test_blur_probability():
    checker = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    sharp = pixels(checker)

    def blurred_fraction(blur_p, draws):
        # sigma >= 1 so every blur is visible (at sigma 0.1 a 5 px kernel is nearly the identity).
        cfg = AugmentConfig(image_size=32, blur_p=blur_p, blur_kernel=5, blur_sigma=(1.0, 2.0), flip_p=0.0)
        cfg = dataclasses.replace(cfg, jitter_p=0.0, grayscale_p=0.0)
        transform = view_transform(dataclasses.replace(cfg, **WHOLE_IMAGE, **RAW))
        torch.manual_seed(0)
        return sum(not torch.allclose(transform(checker), sharp, atol=1e-3) for _ in range(draws)) / draws

    assert blurred_fraction(0.0, 20) == 0.0
    assert blurred_fraction(1.0, 20) == 1.0
    assert 0.35 <= blurred_fraction(0.5, 200) <= 0.65  # mean 0.5, sd 0.035


def test_whole_image_crop_is_the_image():
    img = random_image(24, 24)
    transform = view_transform(AugmentConfig(image_size=24, flip_p=0.0, **WHOLE_IMAGE, **NO_COLOUR, **RAW))
    torch.manual_seed(0)
    for _ in range(5):
        assert torch.allclose(transform(img), pixels(img), atol=1e-6)


def test_crop_scale_is_honoured():
    """Area fraction 1/4 at ratio 1 of a 64 px image is a 32 px window, resized 32 -> 32 unchanged."""
    img = random_image(64, 64)
    whole = pixels(img)
    cfg = AugmentConfig(image_size=32, flip_p=0.0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), **NO_COLOUR, **RAW)
    transform = view_transform(cfg)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(10):
        view = transform(img)
        matches = [
            (i, j) for i in range(33) for j in range(33) if torch.allclose(view, whole[:, i : i + 32, j : j + 32], atol=1e-6)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # the window moves


def bordered_image(size: int, border: int) -> Image.Image:
    """Red frame `border` px wide around a blue square."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[...] = (255, 0, 0)
    img[border : size - border, border : size - border] = (0, 0, 255)
    return Image.fromarray(img)


def test_eval_transform_centre_crops_at_224():
    # 256 px is already 224 / 0.875: the resize is the identity and the crop removes a 16 px frame.
    transform = eval_transform(image_size=224, **RAW)
    out = transform(bordered_image(256, 16))
    assert out.shape == (3, 224, 224)
    blue = torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 224, 224)
    assert torch.allclose(out, blue, atol=1e-6)
    assert transform(random_image(300, 400)).shape == (3, 224, 224)  # short side 256, then 224 x 224


def test_eval_transform_does_not_crop_small_images():
    transform = eval_transform(image_size=32, **RAW)
    img = random_image(32, 32)
    assert torch.allclose(transform(img), pixels(img), atol=1e-6)
    out = transform(bordered_image(40, 4))
    assert out.shape == (3, 32, 32)
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.02)  # the frame survives


def test_eval_transform_normalises():
    out = eval_transform(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)(constant_image(32, (255, 255, 255)))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-5)


def test_train_eval_transform_crops_and_flips_only():
    transform = train_eval_transform(image_size=32, **RAW)
    torch.manual_seed(0)
    rgb = (200, 40, 90)
    expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255
    for _ in range(20):
        out = transform(constant_image(48, rgb))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.allclose(out, expected.expand_as(out), atol=1 / 255)  # no colour change, ever
    flips = sum(first_column_is_white(transform(half_and_half(32))) for _ in range(100))
    assert 0 < flips < 100


def test_default_config_is_valid():
    AugmentConfig().validate()
    AugmentConfig().resolved().validate()
    AugmentConfig(image_size=32).resolved().validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 4),
        ("image_size", 32.0),
        ("image_size", True),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_scale", (0.5,)),
        ("crop_ratio", (1.5, 0.5)),
        ("crop_ratio", (-1.0, 1.0)),
        ("flip_p", 1.5),
        ("flip_p", -0.1),
        ("jitter_p", 2),
        ("grayscale_p", float("nan")),
        ("blur_p", 1.01),
        ("color_strength", -0.5),
        ("color_strength", 3.0),
        ("blur_sigma", (2.0, 0.1)),
        ("blur_sigma", (0.0, 1.0)),
        ("blur_kernel", 4),
        ("blur_kernel", 1),
        ("blur_kernel", 5.0),
        ("interpolation", "nearest"),
        ("mean", (0.5, 0.5)),
        ("std", (0.2, 0.0, 0.2)),
        ("std", (0.2, -0.1, 0.2)),
    ],
)
def test_validate_names_field_and_value(field, value):
    cfg = dataclasses.replace(AugmentConfig(), **{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    message = str(info.value)
    assert f"augment.{field}" in message and repr(value) in message and "\n" not in message
    with pytest.raises(ConfigError):
        view_transform(cfg)


def test_eval_transforms_validate_arguments():
    with pytest.raises(ConfigError, match="std"):
        eval_transform(image_size=32, mean=(0, 0, 0), std=(1, 0, 1))
    with pytest.raises(ConfigError, match="interpolation"):
        train_eval_transform(image_size=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="box")
    with pytest.raises(ConfigError, match="crop_fraction"):
        eval_transform(image_size=224, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=1.5)
