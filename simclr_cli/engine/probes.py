"""Structural probes that need no labels (the ViRB lesson, Kotar et al. 2021: structure ranks encoders differently
from semantics): each builds its inputs and targets from any images, and a frozen encoder's features are scored by a
linear fit on a train split of those images and measured on a held-out split.

- rotation: every image at 0, 90, 180 and 270 degrees (counter-clockwise); predict which (4-way, Gidaris et al. 2018).
- jigsaw: the image cut into a 3 x 3 grid of patches, each resized back to the encoder's input size; for the centre
  patch paired with each of its 8 neighbours, predict where the neighbour sits (8-way, from the two patches' h
  concatenated: Doersch et al. 2015's relative position, without their gaps and jitter, so low-level continuity
  at the patch borders is not hidden; the probe is linear on pooled features, which keep little of it).
- colour-grid (dense): the last stage's feature map (layer4, before pooling) averaged to a 2 x 2 grid of cells; from
  each cell's C features predict the mean RGB colour, in [0, 1], of the matching quarter of the image the encoder saw
  (one linear map shared by the cells, like a 1x1 convolution). Scored by R^2 on the held-out images.

The classification probes share `logistic.fit_linear` (L-BFGS, L2 1e-4, standardised features: linear-eval's cached
protocol) and report top-1; colour-grid is a closed-form ridge regression (`fit_ridge`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

ROTATIONS = (0, 1, 2, 3)  # quarter turns, counter-clockwise: 0, 90, 180, 270 degrees
JIGSAW_GRID = 3
CENTRE = 4  # row-major index of the centre cell of the 3 x 3 grid
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # the jigsaw label of the pair (centre, cell NEIGHBOURS[label])
COLOUR_GRID = 2
RIDGE_L2 = 1e-3  # x the number of training rows, on standardised features: a light penalty for near-collinear maps


def rotate(x: Tensor, turns: int) -> Tensor:
    """x (..., H, W) turned `turns` quarter turns counter-clockwise (as displayed, row 0 at the top): torch.rot90's
    direction over the last two dims, written as transpose + flip so the test can check one against the other."""
    turns %= 4
    if turns == 1:
        return x.transpose(-2, -1).flip(-2)
    if turns == 2:
        return x.flip(-2).flip(-1)
    if turns == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def grid_patches(x: Tensor, *, grid: int = JIGSAW_GRID) -> Tensor:
    """x (3, S, S) as its grid x grid patches (grid^2, 3, S, S), row-major, each cell of side S // grid (the remainder
    at the right and bottom is dropped) resized back to S x S (bilinear) so the encoder sees its own input size."""
    side = x.shape[-1] // grid
    if side < 1:
        raise ValueError(f"an image of {x.shape[-1]} px cannot be cut into a {grid} x {grid} grid")
    cells = [x[:, r * side : (r + 1) * side, c * side : (c + 1) * side] for r in range(grid) for c in range(grid)]
    patches = torch.stack(cells)  # (grid^2, 3, side, side)
    return F.interpolate(patches, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (grid^2, 3, S, S)


def relative_pairs(patch_features: Tensor) -> tuple[Tensor, Tensor]:
    """From features of every image's 9 patches (N, 9, D): the pairs (centre, neighbour) as rows (8N, 2D) of
    [h_centre, h_neighbour] and their labels (8N,), the neighbour's index in NEIGHBOURS; image by image."""
    n, cells, d = patch_features.shape
    if cells != JIGSAW_GRID**2:
        raise ValueError(f"expected {JIGSAW_GRID ** 2} patch features per image, got {cells}")
    centre = patch_features[:, CENTRE : CENTRE + 1].expand(n, len(NEIGHBOURS), d)  # (N, 8, D)
    neighbours = patch_features[:, list(NEIGHBOURS)]  # (N, 8, D)
    rows = torch.cat([centre, neighbours], dim=2).reshape(n * len(NEIGHBOURS), 2 * d)  # (8N, 2D)
    return rows, torch.arange(len(NEIGHBOURS)).repeat(n)


def cell_means(pixels: Tensor, *, grid: int = COLOUR_GRID) -> Tensor:
    """The mean of each channel over each cell of a grid x grid partition: pixels (B, C, S, S) -> (B, grid^2, C),
    cells row-major (adaptive average pooling: the same cells `grid_features` averages the feature map over)."""
    return F.adaptive_avg_pool2d(pixels, grid).flatten(2).transpose(1, 2)


def grid_features(feature_map: Tensor, *, grid: int = COLOUR_GRID) -> Tensor:
    """A stage's output (B, C, H, W) averaged to grid x grid cells: (B, grid^2, C), cells row-major."""
    return cell_means(feature_map.float(), grid=grid)


class TransformedViews(Dataset):
    """Item i: view i % views of image i // views, each image through `transform` (a tensor (3, S, S)) and then
    `make_views` (all its views at once, (views, 3, S, S)); images may be PIL images or (PIL, label) pairs. The
    last image's views are kept, so reading the items in order decodes and cuts each image once."""

    def __init__(self, images: Dataset, transform: Callable[[Image.Image], Tensor], make_views: Callable[[Tensor], Tensor],
                 *, views: int) -> None:
        self.images, self.transform, self.make_views, self.views = images, transform, make_views, views
        self._last: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images) * self.views

    def __getitem__(self, index: int) -> Tensor:
        image_index = index // self.views
        if self._last is None or self._last[0] != image_index:
            item = self.images[image_index]
            self._last = (image_index, self.make_views(self.transform(item[0] if isinstance(item, tuple) else item)))
        return self._last[1][index % self.views]


def rotated_views(images: Dataset, transform: Callable[[Image.Image], Tensor], turns: Sequence[int]) -> TransformedViews:
    """Every image turned by each of `turns` (image-major: rows i*len(turns) .. are image i's)."""
    turns = tuple(turns)
    return TransformedViews(images, transform, lambda x: torch.stack([rotate(x, k) for k in turns]), views=len(turns))


def patch_views(images: Dataset, transform: Callable[[Image.Image], Tensor]) -> TransformedViews:
    """Every image's 9 jigsaw patches (image-major, row-major within an image)."""
    return TransformedViews(images, transform, grid_patches, views=JIGSAW_GRID**2)


def colour_targets(images: Dataset, transform: Callable[[Image.Image], Tensor], *, mean: Sequence[float],
                   std: Sequence[float], grid: int = COLOUR_GRID) -> Tensor:
    """The colour-grid targets (N, grid^2, 3): each cell's mean RGB in [0, 1] of the image as the encoder saw it
    (its transform, normalisation undone)."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for i in range(len(images)):
        item = images[i]
        x = transform(item[0] if isinstance(item, tuple) else item).unsqueeze(0)  # (1, 3, S, S), normalised
        out.append(cell_means(x * std_t + mean_t, grid=grid))
    return torch.cat(out) if out else torch.zeros(0, grid * grid, 3)


def fit_ridge(x: Tensor, y: Tensor, *, l2: float = RIDGE_L2) -> Callable[[Tensor], Tensor]:
    """Ridge regression y ~ x in float64, closed form on features standardised with x's mean and std:
    W = (X^T X + l2 n I)^-1 X^T (y - mean y). Returns the predictor rows (M, D) -> (M, T)."""
    x, y = x.double(), y.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dimensions stay 0
    xs = (x - mean) / std  # (N, D)
    y_mean = y.mean(dim=0)  # (T,)
    gram = xs.T @ xs + l2 * len(x) * torch.eye(x.shape[1], dtype=torch.float64)  # (D, D)
    weight = torch.linalg.solve(gram, xs.T @ (y - y_mean))  # (D, T)
    return lambda rows: ((rows.double() - mean) / std) @ weight + y_mean


def r2_score(predicted: Tensor, target: Tensor) -> float:
    """Coefficient of determination pooled over every output: 1 - sum (y - y_hat)^2 / sum (y - mean y)^2, with
    the mean per output column; 1 is perfect, 0 is predicting each column's mean, below 0 worse than that."""
    predicted, target = predicted.double(), target.double()
    residual = (target - predicted).square().sum()
    total = (target - target.mean(dim=0)).square().sum()
    return float("nan") if total == 0 else float(1 - residual / total)
