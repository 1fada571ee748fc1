"""SimCLR views as batched tensor operations on the training device (SimCLR §3, Appendix A).

The same random transform as `augment.view_transform` (torchvision's PIL pipeline, the reference),
applied to a whole batch at once: crop-and-resize, flip, colour jitter with its four ops in a random
order per image, grayscale and blur each run as a few batched kernels on the CPU or the GPU, instead
of ~10 Python calls per image in a data worker.

Randomness is counter-based: every number a view draws is a hash of (seed, epoch, image index, view,
draw), so a view does not depend on batch composition, process count, worker count or device, and
resuming mid-epoch redraws exactly the views an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_cli.engine import seeds
from simclr_cli.engine.augment import AugmentConfig
from simclr_cli.engine.errors import ConfigError

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many (area, ratio) draws before its fallback
# Where each view's draws sit in its row of uniforms.
_AREA, _RATIO, _TOP, _LEFT = (slice(k * CROP_ATTEMPTS, (k + 1) * CROP_ATTEMPTS) for k in range(4))
_FLIP, _JITTER, _GRAY, _BLUR, _SIGMA = range(4 * CROP_ATTEMPTS, 4 * CROP_ATTEMPTS + 5)
_FACTORS = slice(_SIGMA + 1, _SIGMA + 5)  # brightness, contrast, saturation, hue
_ORDER = slice(_SIGMA + 5, _SIGMA + 9)
DRAWS = _SIGMA + 9
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CHUNK_PIXELS = 1 << 24  # views resampled together are capped at this many padded source pixels (bounds memory)

_S11 = np.uint64(11)  # a uint64 keeps its top 53 bits as a float64 in [0, 1)


def uniforms(*, seed: int, epoch: int, indices: np.ndarray, view: int, n: int = DRAWS) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a pure function of (seed, epoch, index, view, column)."""
    key = seeds.splitmix64(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = seeds.splitmix64(key ^ np.uint64(epoch))
    key = seeds.splitmix64(key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))  # (B,)
    key = seeds.splitmix64(key ^ np.uint64(view))
    with np.errstate(over="ignore"):
        counters = key[:, None] + np.arange(n, dtype=np.uint64)[None, :] * seeds.GOLDEN  # (B, n)
    bits = seeds.splitmix64(counters)
    return (bits >> _S11).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of B views, on the CPU: which images each op touches is decided there, so applying
    them on a GPU never waits for the device to say how many."""

    crops: Tensor  # (B, 4) int64 top, left, height, width in source pixels
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: colour jitter applied
    factors: Tensor  # (B, 4) float32 brightness, contrast, saturation, hue
    order: Tensor  # (B, 4) int64 jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order applied
    gray: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float32 blur sigma


def crop_boxes(u: np.ndarray, sizes: np.ndarray, *, scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """RandomResizedCrop's box for each image (torchvision's algorithm): (B, 4) top, left, height, width.

    Up to 10 tries of a random area fraction in `scale` and log-uniform aspect ratio in `ratio`; the
    first box that fits is placed uniformly; if none fits, the centred largest box within `ratio`.
    """
    height, width = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)  # (B, 1)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA])  # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, _RATIO])
    w = np.rint(np.sqrt(target * aspect))  # Python's round(): half to even, like np.rint
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, 10)
    first = fits.argmax(axis=1)[:, None]  # (B, 1) the first attempt that fits
    rows = np.arange(len(u))
    h, w = np.take_along_axis(h, first, 1)[:, 0], np.take_along_axis(w, first, 1)[:, 0]
    height, width = height[:, 0], width[:, 0]
    top = np.floor(u[:, _TOP][rows, first[:, 0]] * (height - h + 1))
    left = np.floor(u[:, _LEFT][rows, first[:, 0]] * (width - w + 1))
    # Fallback when no attempt fits: the whole image, cut to the nearest allowed aspect ratio, centred.
    miss = ~fits.any(axis=1)
    if miss.any():
        in_ratio = width[miss] / height[miss]
        fw, fh = width[miss].copy(), height[miss].copy()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fh[narrow] = np.rint(fw[narrow] / min(ratio))
        fw[wide] = np.rint(fh[wide] * max(ratio))
        h[miss], w[miss] = fh, fw
        top[miss] = (height[miss] - fh) // 2
        left[miss] = (width[miss] - fw) // 2
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def draw(cfg: AugmentConfig, *, seed: int, epoch: int, indices: np.ndarray, view: int, sizes: np.ndarray) -> ViewParams:
    """The random parameters of view `view` (0, 1, ...) of each image; `sizes` (B, 2) are their (height, width)."""
    u = uniforms(seed=seed, epoch=epoch, indices=indices, view=view)  # (B, DRAWS)
    s = cfg.color_strength
    spans = np.array([0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s])  # SimCLR Appendix A's colour distortion at strength s
    low = np.array([max(0.0, 1 - spans[0]), max(0.0, 1 - spans[1]), max(0.0, 1 - spans[2]), -spans[3]])
    high = np.array([1 + spans[0], 1 + spans[1], 1 + spans[2], spans[3]])
    sigma_lo, sigma_hi = cfg.blur_sigma
    return ViewParams(
        crops=torch.from_numpy(crop_boxes(u, np.asarray(sizes), scale=cfg.crop_scale, ratio=cfg.crop_ratio)),
        flip=torch.from_numpy(u[:, _FLIP] < cfg.flip_p),
        jitter=torch.from_numpy(u[:, _JITTER] < cfg.jitter_p),
        factors=torch.from_numpy(low + (high - low) * u[:, _FACTORS]).float(),
        order=torch.from_numpy(np.argsort(u[:, _ORDER], axis=1, kind="stable")),  # a uniformly random permutation
        gray=torch.from_numpy(u[:, _GRAY] < cfg.grayscale_p),
        blur=torch.from_numpy(u[:, _BLUR] < cfg.blur_p),
        sigma=torch.from_numpy(sigma_lo + (sigma_hi - sigma_lo) * u[:, _SIGMA]).float(),
    )


def _bicubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torchvision's bicubic), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: Tensor) -> Tensor:
    return (1 - x.abs()).clamp(min=0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


def resample_weights(start: Tensor, length: Tensor, *, out: int, size: int, interpolation: str) -> Tensor:
    """(B, out, size) weights that resize the span [start, start+length) of each row to `out` pixels.

    PIL's antialiased resampling as a matrix: output pixel i is centred at start + (i + 0.5) * scale in the
    source, and when shrinking (scale > 1) the filter is stretched by `scale`, so it averages every source
    pixel it covers instead of skipping some. Only pixels inside the span contribute (the crop is cut first).
    """
    kernel, support = FILTERS[interpolation]
    start, length = start.to(torch.float32)[:, None, None], length.to(torch.float32)[:, None, None]  # (B, 1, 1)
    scale = length / out
    stretch = scale.clamp(min=1.0)
    centre = start + (torch.arange(out, dtype=torch.float32, device=start.device)[None, :, None] + 0.5) * scale  # (B, out, 1)
    pos = torch.arange(size, dtype=torch.float32, device=start.device)[None, None, :]  # (1, 1, size)
    weights = kernel((pos + 0.5 - centre) / stretch)  # (B, out, size)
    inside = (pos >= start) & (pos < start + length)
    weights = weights * inside
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def resized_crop(images: Tensor, crops: Tensor, *, size: int, interpolation: str) -> Tensor:
    """Crop each image to its box and resize it to size x size: (B, 3, H, W) uint8 -> (B, 3, S, S) float in [0, 1].

    Images smaller than (H, W) sit in the top-left corner of the padded batch; their boxes lie inside them.
    """
    b, _, height, width = images.shape
    out = torch.empty(b, 3, size, size, dtype=torch.float32, device=images.device)
    step = max(1, CHUNK_PIXELS // max(1, 3 * height * width))
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        box = crops[lo:hi]
        rows = resample_weights(box[:, 0], box[:, 2], out=size, size=height, interpolation=interpolation)  # (b, S, H)
        cols = resample_weights(box[:, 1], box[:, 3], out=size, size=width, interpolation=interpolation)  # (b, S, W)
        x = images[lo:hi].to(torch.float32) / 255.0  # (b, 3, H, W)
        # Rows first, then columns, clipping in between as PIL does (its passes store 8-bit pixels): the
        # bicubic kernel overshoots at sharp edges, and unclipped overshoot would leak into the second pass.
        x = torch.matmul(x, cols.transpose(1, 2)[:, None]).clamp_(0.0, 1.0)  # (b, 3, H, S)
        out[lo:hi] = torch.matmul(rows[:, None], x)  # (b, 3, S, S)
    return out.clamp_(0.0, 1.0)


def grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = GRAY_WEIGHTS
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clipped: torchvision's brightness/contrast/saturation primitive."""
    factor = factor[:, None, None, None]
    return (factor * x + (1 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image's hue by `shift` turns (B,), through HSV."""
    value, _ = x.max(dim=1)  # (B, H, W)
    low, _ = x.min(dim=1)
    chroma = value - low
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    r, g, b = x.unbind(dim=1)
    # hue in sixths of a turn, by which channel is the maximum (red first on ties, as torchvision)
    hue = torch.where(
        value == r, ((g - b) / safe_chroma) % 6, torch.where(value == g, (b - r) / safe_chroma + 2, (r - g) / safe_chroma + 4)
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift[:, None, None]) % 1.0  # (B, H, W)
    # back to RGB: channel n in (R, G, B) uses k = (n' + 6h) mod 6 with n' = 5, 3, 1
    offsets = _to(torch.tensor([5.0, 3.0, 1.0]), x.device)[None, :, None, None]
    k = (offsets + 6 * hue[:, None]) % 6  # (B, 3, H, W)
    ramp = torch.minimum(k, 4 - k).clamp(0.0, 1.0)
    return (value[:, None] - value[:, None] * saturation[:, None] * ramp).clamp(0.0, 1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply the four colour ops to each image in its own order: op order[b, k] at position k (`order` on the CPU)."""
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            chosen = (order[:, position] == op_index).nonzero().squeeze(1)
            if len(chosen):
                rows = _to(chosen, x.device)
                x[rows] = op(x[rows], factors[rows, op_index])
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, *, kernel: int) -> Tensor:
    """Blur each image with its own sigma (B,): a separable k x k Gaussian, edges reflected."""
    b, c, height, width = x.shape
    radius = kernel // 2
    t = torch.arange(kernel, dtype=torch.float32, device=x.device) - (kernel - 1) / 2
    weights = torch.softmax(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2), dim=1)  # (B, k) normalised Gaussians
    weights = weights.repeat_interleave(c, dim=0)  # (B*C, k): one filter per image channel
    planes = F.pad(x.reshape(1, b * c, height, width), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, weights[:, None, None, :], groups=b * c)  # along rows
    planes = F.conv2d(planes, weights[:, None, :, None], groups=b * c)  # along columns
    return planes.reshape(b, c, height, width)


def apply(cfg: AugmentConfig, images: Tensor, params: ViewParams) -> Tensor:
    """The views of a padded uint8 batch (B, 3, H, W) under `params` (on the CPU): (B, 3, S, S) float32, normalised."""
    device = images.device
    x = resized_crop(images, _to(params.crops, device), size=cfg.image_size, interpolation=cfg.interpolation)
    x = torch.where(_to(params.flip, device)[:, None, None, None], x.flip(-1), x)
    jittered = params.jitter.nonzero().squeeze(1)  # on the CPU, like every choice of which images an op touches
    if len(jittered):
        rows = _to(jittered, device)
        x[rows] = color_jitter(x[rows], _to(params.factors[jittered], device), params.order[jittered])
    x = torch.where(_to(params.gray, device)[:, None, None, None], grayscale(x).expand_as(x), x)
    blurred = params.blur.nonzero().squeeze(1)
    if len(blurred):
        rows = _to(blurred, device)
        x[rows] = gaussian_blur(x[rows], _to(params.sigma[blurred], device), kernel=cfg.blur_kernel)
    mean = _to(torch.tensor(cfg.mean, dtype=torch.float32), device)[None, :, None, None]
    std = _to(torch.tensor(cfg.std, dtype=torch.float32), device)[None, :, None, None]
    return (x - mean) / std


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device` without waiting: a blocking copy to a GPU would first wait for every kernel
    already queued (the previous step's backward), stalling the host once per op."""
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class Crops:
    """`count` views of every image, each `size` pixels square, cropped from `scale` of the image's area (None:
    augment.crop_scale); a group of a method's views (methods.base.Method.crops)."""

    count: int
    size: int
    scale: tuple[float, float] | None = None


class BatchViews:
    """The views of every image of a batch, on the batch's device: by default two SimCLR views (SimCLR §2.1); a method
    may ask for other groups of crops (SwAV's multi-crop: 2 large and 6 small).

    Each group is the augment config at its own size and crop scale, everything else (colour, blur in pixels,
    flip) alike. Views are numbered across the groups (0, 1 for the first group's, 2, ... for the next one's), and
    that number is what a view's randomness is drawn from."""

    def __init__(self, cfg: AugmentConfig, *, seed: int, crops: tuple[Crops, ...] | None = None) -> None:
        cfg = cfg.resolved()
        cfg.validate()
        self.groups = [(replace(cfg, image_size=group.size, crop_scale=group.scale or cfg.crop_scale), group.count)
                       for group in crops or (Crops(count=2, size=cfg.image_size),)]
        for group_cfg, _ in self.groups:
            group_cfg.validate()
            if group_cfg.blur_p > 0 and group_cfg.blur_kernel // 2 >= group_cfg.image_size:
                raise ConfigError(
                    f"augment.blur_kernel {group_cfg.blur_kernel} is too large for {group_cfg.image_size} px views; "
                    f"use an odd kernel below {2 * group_cfg.image_size}, or leave it unset"
                )
        self.seed = seed

    def __call__(self, images: Tensor, sizes: Tensor, indices: Tensor, *, epoch: int) -> list[Tensor]:
        """(B, 3, H, W) uint8 padded images, their (B, 2) true sizes and dataset indices -> one (count * B, 3, S, S)
        tensor per group, view-major (all first views, then all second views, ...)."""
        sizes_np, indices_np = sizes.cpu().numpy(), indices.cpu().numpy()
        out, first = [], 0  # `first`: the number of the group's first view
        for cfg, count in self.groups:
            views = [apply(cfg, images, draw(cfg, seed=self.seed, epoch=epoch, indices=indices_np, view=first + k, sizes=sizes_np))
                     for k in range(count)]
            out.append(torch.cat(views))
            first += count
        return out
