"""Batched SimCLR views against references: torchvision's functional ops, PIL's resize and the PIL pipeline.

Each op is checked image by image against an independent reference given the same parameters; the
random parameters are checked against torchvision's own algorithm; and the whole transform's output
statistics are compared with `augment.view_transform` (torchvision's PIL pipeline, the reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from simclr_cli.engine import views
from simclr_cli.engine.augment import AugmentConfig, view_transform
from simclr_cli.engine.errors import ConfigError

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def random_pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def smooth_pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Photo-like images: random colour blobs upsampled, so crops and blurs change them the way they change photos."""
    low = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def as_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


# --- counter-based randomness ---------------------------------------------------------------------


def test_uniforms_are_in_range_and_a_function_of_their_key():
    u = views.uniforms(seed=3, epoch=1, indices=np.arange(500), view=0)
    assert u.shape == (500, views.DRAWS)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    again = views.uniforms(seed=3, epoch=1, indices=np.array([7, 499, 0]), view=0)
    np.testing.assert_array_equal(again, u[[7, 499, 0]])  # a row depends on its index, not on the batch


@pytest.mark.parametrize("change", [{"seed": 4}, {"epoch": 2}, {"view": 1}])
def test_uniforms_change_with_seed_epoch_and_view(change):
    base = {"seed": 3, "epoch": 1, "view": 0}
    a = views.uniforms(indices=np.arange(50), **base)
    b = views.uniforms(indices=np.arange(50), **{**base, **change})
    assert not np.isclose(a, b).any()


def test_uniform_columns_are_uncorrelated():
    u = views.uniforms(seed=0, epoch=0, indices=np.arange(4000), view=0)
    corr = np.corrcoef(u.T)
    off_diagonal = corr[~np.eye(len(corr), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.08  # 4000 samples: the standard error of a correlation is ~0.016


# --- crop parameters ------------------------------------------------------------------------------


def reference_box(u_row: np.ndarray, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params written out for one image, drawing from `u_row`."""
    area = height * width
    for attempt in range(views.CROP_ATTEMPTS):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_row[attempt])
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_row[views.CROP_ATTEMPTS + attempt]
        aspect = math.exp(log_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_row[2 * views.CROP_ATTEMPTS + attempt] * (height - h + 1))
            left = int(u_row[3 * views.CROP_ATTEMPTS + attempt] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (50, 120, (0.08, 1.0), (3 / 4, 4 / 3)), (10, 200, (0.5, 1.0), (0.9, 1.1)),
     (3, 4, (0.08, 1.0), (3 / 4, 4 / 3))],
)
def test_crop_boxes_follow_torchvisions_algorithm(height, width, scale, ratio):
    u = views.uniforms(seed=1, epoch=0, indices=np.arange(400), view=0)
    sizes = np.tile([height, width], (400, 1))
    boxes = views.crop_boxes(u, sizes, scale=scale, ratio=ratio)
    expected = np.array([reference_box(row, height, width, scale, ratio) for row in u])
    np.testing.assert_array_equal(boxes, expected)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()


def test_crop_area_distribution_matches_torchvision():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    image = torch.zeros(3, 60, 80)
    theirs = np.array([np.prod(v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])[2:]) for _ in range(4000)])
    u = views.uniforms(seed=2, epoch=0, indices=np.arange(4000), view=0)
    ours = np.prod(views.crop_boxes(u, np.tile([60, 80], (4000, 1)), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))[:, 2:], axis=1)
    assert ks_statistic(ours, theirs) < 0.04  # the two-sample KS 1% critical value at n = 4000 each is ~0.036


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# --- crop and resize ------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("box", [(3, 5, 20, 30), (0, 0, 40, 50), (10, 10, 5, 7), (39, 49, 1, 1), (0, 20, 40, 13)])
def test_resized_crop_matches_pil(box, interpolation):
    pixels = smooth_pixels(1, 50)[:, :, :40]  # photo-like: on pure noise PIL's pass order (it varies) shows in ringing
    top, left, h, w = box
    out = views.resized_crop(pixels, torch.tensor([box]), size=24, interpolation=interpolation)
    mode = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    reference = as_pil(pixels[0]).crop((left, top, left + w, top + h)).resize((24, 24), mode)
    expected = torch.from_numpy(np.asarray(reference, dtype=np.float32) / 255).permute(2, 0, 1)
    # PIL rounds to 8 bits between its two passes and at the end; the batched path keeps floats
    assert (out[0] - expected).abs().max() <= 1.5 / 255
    assert (out[0] - expected).abs().mean() <= 0.5 / 255


def test_resized_crop_ignores_padding_and_batch_neighbours():
    small = random_pixels(1, 20, 30, seed=1)
    padded = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    padded[0, :, :20, :30] = small[0]
    padded[1] = random_pixels(1, 64, 64, seed=2)[0]
    boxes = torch.tensor([[2, 3, 18, 27], [0, 0, 64, 64]])
    alone = views.resized_crop(small, boxes[:1], size=16, interpolation="bicubic")
    together = views.resized_crop(padded, boxes, size=16, interpolation="bicubic")
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)


def test_resized_crop_splits_large_batches_into_chunks(monkeypatch):
    pixels = random_pixels(5, 16, 16)
    boxes = torch.tensor([[0, 0, 16, 16], [1, 2, 10, 12], [4, 4, 4, 4], [0, 3, 16, 9], [2, 2, 12, 12]])
    whole = views.resized_crop(pixels, boxes, size=8, interpolation="bicubic")
    monkeypatch.setattr(views, "CHUNK_PIXELS", 3 * 16 * 16 * 2)  # two images per chunk
    torch.testing.assert_close(views.resized_crop(pixels, boxes, size=8, interpolation="bicubic"), whole, atol=1e-6, rtol=0)


# --- colour ops, one image at a time against torchvision's tensor functions ------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(views.adjust_brightness, TF.adjust_brightness), (views.adjust_contrast, TF.adjust_contrast),
     (views.adjust_saturation, TF.adjust_saturation)],
)
def test_blend_ops_match_torchvision(ours, theirs):
    x = torch.rand(6, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.5, 1.8])
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(6)])
    torch.testing.assert_close(ours(x.clone(), factors), expected, atol=1e-6, rtol=0)


def test_hue_matches_torchvision_including_grey_and_black_pixels():
    x = torch.rand(6, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    x[0] = 0.5  # grey: no hue
    x[1, :, :3] = 0.0  # black
    x[2, 0] = x[2, 1]  # red == green ties
    shifts = torch.tensor([0.1, -0.5, 0.5, 0.0, 0.25, -0.13])
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(views.adjust_hue(x, shifts), expected, atol=2e-6, rtol=0)


def test_grayscale_matches_torchvision():
    x = torch.rand(3, 3, 5, 5)
    expected = torch.stack([TF.rgb_to_grayscale(x[i], num_output_channels=1) for i in range(3)])
    torch.testing.assert_close(views.grayscale(x), expected, atol=1e-6, rtol=0)


def test_color_jitter_applies_each_images_own_order():
    x = torch.rand(24, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    factors = torch.tensor([1.6, 0.4, 1.7, 0.2]).repeat(24, 1)  # strong enough that the order matters
    order = torch.tensor(list(__import__("itertools").permutations(range(4))))  # all 24 orders, one per image
    got = views.color_jitter(x.clone(), factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(24):
        expected = x[i]
        for op in order[i].tolist():
            expected = ops[op](expected, float(factors[i, op]))
        torch.testing.assert_close(got[i], expected, atol=2e-6, rtol=0)
    assert not torch.allclose(got[0], got[23], atol=1e-3)


@pytest.mark.parametrize("kernel", [3, 5, 23])
def test_gaussian_blur_matches_torchvision(kernel):
    x = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])] * 2) for i in range(4)])
    torch.testing.assert_close(views.gaussian_blur(x, sigma, kernel=kernel), expected, atol=1e-5, rtol=0)


# --- the whole view -------------------------------------------------------------------------------


def reference_view(cfg: AugmentConfig, pixels: torch.Tensor, p: views.ViewParams, b: int) -> torch.Tensor:
    """One view built with torchvision's functions from the same parameters, in the reference order."""
    top, left, h, w = p.crops[b].tolist()
    mode = Image.BICUBIC if cfg.interpolation == "bicubic" else Image.BILINEAR
    crop = as_pil(pixels).crop((left, top, left + w, top + h)).resize((cfg.image_size, cfg.image_size), mode)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)
    if p.flip[b]:
        x = TF.horizontal_flip(x)
    if p.jitter[b]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in p.order[b].tolist():
            x = ops[op](x, float(p.factors[b, op]))
    if p.gray[b]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[b]:
        x = TF.gaussian_blur(x, [cfg.blur_kernel] * 2, [float(p.sigma[b])] * 2)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


@pytest.mark.parametrize("image_size", [16, 72])
def test_apply_matches_torchvision_ops_with_the_same_parameters(image_size):
    cfg = AugmentConfig(image_size=image_size, blur_p=0.5).resolved()
    pixels = smooth_pixels(16, 90)
    params = views.draw(cfg, seed=0, epoch=0, indices=np.arange(16), view=0, sizes=np.tile([90, 90], (16, 1)))
    assert params.jitter.any() and params.blur.any() and params.flip.any() and (~params.flip).any()
    out = views.apply(cfg, pixels, params)
    for b in range(16):
        expected = reference_view(cfg, pixels[b], params, b)
        # 8-bit rounding in PIL's resize, amplified at most by the contrast and normalisation steps
        assert (out[b] - expected).abs().max() < 0.1, b
        assert (out[b] - expected).abs().mean() < 0.01, b


def test_draw_uses_the_configured_ranges():
    cfg = AugmentConfig(image_size=224, color_strength=0.5).resolved()
    p = views.draw(cfg, seed=0, epoch=0, indices=np.arange(3000), view=0, sizes=np.tile([256, 256], (3000, 1)))
    low = torch.tensor([0.6, 0.6, 0.6, -0.1])
    high = torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert (p.factors >= low).all() and (p.factors <= high).all()
    assert (p.factors.min(0).values - low).abs().max() < 0.01 and (p.factors.max(0).values - high).abs().max() < 0.01
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(getattr(p, name).float().mean().item() - prob) < 0.03, name
    orders = {tuple(row) for row in p.order.tolist()}
    assert len(orders) == 24  # every permutation of the four colour ops occurs


def test_batch_views_shape_order_and_determinism():
    bv = views.BatchViews(AugmentConfig(image_size=16), seed=5)
    pixels = smooth_pixels(8, 32)
    sizes, indices = torch.tensor([[32, 32]] * 8), torch.arange(100, 108)
    (x,) = bv(pixels, sizes, indices, epoch=3)  # the default: one group of two views
    assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(bv(pixels, sizes, indices, epoch=3)[0], x, atol=0, rtol=0)
    assert not torch.allclose(x[:8], x[8:])  # view 1 and view 2 differ
    assert not torch.allclose(bv(pixels, sizes, indices, epoch=4)[0], x)  # a new epoch, new views
    # an image's views do not depend on the rest of the batch
    torch.testing.assert_close(bv(pixels[2:3], sizes[2:3], indices[2:3], epoch=3)[0], x[[2, 10]], atol=1e-5, rtol=0)


def test_batch_views_refuses_a_blur_kernel_larger_than_the_view():
    with pytest.raises(ConfigError, match="blur_kernel"):
        views.BatchViews(AugmentConfig(image_size=8, blur_p=0.5, blur_kernel=17), seed=0)


def test_crop_groups_have_their_own_size_and_scale_and_number_their_views_on():
    """SwAV's multi-crop: a group of large crops, then one of small crops from a smaller share of the image."""
    cfg = AugmentConfig(image_size=16, crop_scale=(0.14, 1.0))
    bv = views.BatchViews(cfg, seed=5, crops=(views.Crops(count=2, size=16), views.Crops(count=3, size=8, scale=(0.05, 0.14))))
    pixels, sizes, indices = smooth_pixels(4, 32), torch.tensor([[32, 32]] * 4), torch.arange(4)
    large, small = bv(pixels, sizes, indices, epoch=1)
    assert large.shape == (8, 3, 16, 16) and small.shape == (12, 3, 8, 8)
    (two,) = views.BatchViews(cfg, seed=5)(pixels, sizes, indices, epoch=1)
    torch.testing.assert_close(large, two, atol=0, rtol=0)  # the first group is the default pair, views 0 and 1
    small_cfg = bv.groups[1][0]
    assert (small_cfg.image_size, small_cfg.crop_scale) == (8, (0.05, 0.14))
    for k in range(3):  # views 2, 3, 4, each with crops of 5-14% of the image (up to the rounding of the box)
        params = views.draw(small_cfg, seed=5, epoch=1, indices=indices.numpy(), view=2 + k, sizes=sizes.numpy())
        area = (params.crops[:, 2] * params.crops[:, 3]).float() / (32 * 32)
        assert ((area > 0.04) & (area < 0.16)).all(), area
        torch.testing.assert_close(small[4 * k : 4 * (k + 1)], views.apply(small_cfg, pixels, params), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="blur_kernel 17 is too large for 8 px views"):
        views.BatchViews(AugmentConfig(image_size=16, blur_p=0.5, blur_kernel=17), seed=0,
                         crops=(views.Crops(count=2, size=16), views.Crops(count=2, size=8)))


def summary_statistics(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-view statistics of (V, 3, S, S) pixel views in [0, 1]."""
    grey = (batch.max(dim=1).values - batch.min(dim=1).values).amax(dim=(1, 2)) < 1e-3
    return {
        "mean": batch.mean(dim=(2, 3)).numpy(),  # (V, 3)
        "contrast": batch.std(dim=(1, 2, 3)).numpy(),  # (V,)
        "saturation": (batch.max(dim=1).values - batch.min(dim=1).values).mean(dim=(1, 2)).numpy(),
        "grey": grey.float().numpy(),
        "left_right": (batch[..., : batch.shape[-1] // 2].mean(dim=(1, 2, 3)) - batch[..., batch.shape[-1] // 2 :].mean(dim=(1, 2, 3))).numpy(),
    }


@pytest.mark.parametrize(("image_size", "blur_p"), [(24, 0.0), (40, 0.5)])
def test_view_statistics_match_the_pil_pipeline(image_size, blur_p):
    """Same 40 images, 20 views of each from both pipelines: the statistics of the views agree.

    Paired by image: for each statistic, the per-image mean and spread over its views differ between the
    pipelines by no more than chance (|t| < 4.5 over the 40 images); pooled over images, the KS distance
    stays below the two-sample 0.1% critical value. Both pipelines are seeded, so the test is repeatable.
    """
    cfg = AugmentConfig(image_size=image_size, blur_p=blur_p, **RAW).resolved()
    n, repeats = 40, 20
    pixels = smooth_pixels(n, 64, seed=7)
    pixels[:, :, :, :32] //= 3  # darker left half: flips change the left-right difference
    batch_views = views.BatchViews(cfg, seed=11)
    sizes = torch.tensor([[64, 64]] * n)
    ours = torch.stack([batch_views(pixels, sizes, torch.arange(n), epoch=e)[0][:n] for e in range(repeats)], dim=1)  # (n, R, 3, S, S)
    reference = view_transform(cfg)
    torch.manual_seed(0)
    theirs = torch.stack([torch.stack([reference(as_pil(p)) for _ in range(repeats)]) for p in pixels])
    a, b = summary_statistics(ours.flatten(0, 1)), summary_statistics(theirs.flatten(0, 1))
    a["brightness"], b["brightness"] = a["mean"].mean(axis=1), b["mean"].mean(axis=1)
    for name in ("contrast", "saturation", "left_right", "grey", "brightness"):
        for summary in (np.mean, np.std):
            d = summary(a[name].reshape(n, repeats), axis=1) - summary(b[name].reshape(n, repeats), axis=1)  # (n,)
            t = d.mean() / max(d.std(ddof=1) / math.sqrt(n), 1e-12)
            assert abs(t) < 4.5, (name, summary.__name__, t)
    # 800 views each; the two-sample KS 0.1% critical value is 1.95 * sqrt(2 / 800) = 0.098
    for name in ("contrast", "saturation", "left_right", "brightness"):
        assert ks_statistic(a[name], b[name]) < 0.098, name
