"""Pretraining-data experiments: train on a seed-drawn part of the data (`--subset N`), or on a log-unbalanced draw
of a labelled dataset's classes (`--unbalanced ALPHA`), the pretraining-data axis of the ViRB study (Kotar et al.
2021: the balance of the data matters).

The log-unbalanced draw: the C classes are put in an order drawn with the seed; the class at rank r (0..C-1) keeps

    k_r = max(1, floor(n_r * ALPHA ** (-r / (C - 1)) + 1/2))

of its n_r images (all of them when C = 1), drawn with the seed. log(k_r / n_r) falls linearly with the rank, from
the whole first class to 1/ALPHA of the last: ALPHA is the ratio of the largest to the smallest fraction kept, and
ALPHA 1 keeps everything. With both options the unbalanced draw comes first and `--subset` draws from what it kept.
Every process draws the same images (the seed fixes them), before the sampler splits them across processes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from simclr_cli.engine import shards
from simclr_cli.engine.errors import DataError
from simclr_cli.engine.images import ImageFiles

log = logging.getLogger("simclr")


def unbalanced_counts(sizes: Sequence[int], *, alpha: float, ranks: Sequence[int]) -> list[int]:
    """k_c, the images class c keeps, for classes of `sizes` at `ranks` (a permutation of 0..C-1): the formula above."""
    last = len(sizes) - 1
    if last == 0:
        return [int(sizes[0])]
    return [max(1, math.floor(n * alpha ** (-r / last) + 0.5)) for n, r in zip(sizes, ranks, strict=True)]


def unbalanced_indices(labels: Sequence[int], *, alpha: float, seed: int) -> list[int]:
    """Sorted indices of a log-unbalanced draw of the classes `labels` give (classes: their sorted distinct labels)."""
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    ranks = np.argsort(rng.permutation(len(classes)))  # class i's place in the drawn order
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = unbalanced_counts([len(m) for m in members], alpha=alpha, ranks=ranks.tolist())
    chosen = [rng.permutation(m)[:k] for m, k in zip(members, counts, strict=True)]
    return sorted(int(i) for i in np.concatenate(chosen))


def subset_indices(count: int, size: int, *, seed: int) -> list[int]:
    """Sorted indices of `size` of `count` images drawn with `seed` (the same draw on every process)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return sorted(int(i) for i in rng.permutation(count)[:size])


def draw(images: Dataset, *, subset: int | None, unbalanced: float | None, seed: int, source: str | None) -> Dataset:
    """`images` as the data config asks: the log-unbalanced draw (labels from `class_labels`), then `subset` of them;
    `images` itself when neither is set. DataError when the data cannot give what is asked."""
    if unbalanced is None and subset is None:
        return images
    total = len(images)
    indices = list(range(total))
    if unbalanced is not None:
        indices = unbalanced_indices(class_labels(images, source=source), alpha=unbalanced, seed=seed)
        log.info("data: a log-unbalanced draw (--unbalanced %g, seed %d) keeps %d of the %d images", unbalanced, seed,
                 len(indices), total)
    if subset is not None:
        if subset > len(indices):
            raise DataError(f"--subset {subset} is more than the {len(indices)} images "
                            f"{'the unbalanced draw keeps' if unbalanced is not None else 'of the data'}; use at most {len(indices)}")
        log.info("data: a subset of %d of %d images (--subset, seed %d)", subset, len(indices), seed)
        indices = [indices[i] for i in subset_indices(len(indices), subset, seed=seed)]
    return select(images, indices)


def class_labels(images: Dataset, *, source: str | None) -> list[int]:
    """Each image's class: a named dataset's labels, or for a folder the subfolder of DATA it lies in. DataError for
    data without classes (images directly in DATA, tar shards, STL-10's unlabelled part)."""
    if isinstance(images, ImageFiles):
        return _folder_classes(images.paths, base=Path(source or ".").expanduser())
    targets = getattr(getattr(images, "dataset", None), "targets", None)  # datasets.Unlabelled(a labelled dataset)
    if targets is None or isinstance(images, shards.ShardImages):
        raise DataError("--unbalanced needs class labels: a named labelled dataset or a folder of class subfolders, "
                        "not tar shards; drop --unbalanced or use --subset")
    labels = [int(t) for t in targets]
    if any(t < 0 for t in labels):
        raise DataError(f"--unbalanced needs class labels, and {sum(t < 0 for t in labels)} images of {source} have "
                        "none (STL-10's unlabelled part); drop --unbalanced or pretrain on a labelled dataset")
    return labels


def _folder_classes(paths: Sequence[Path], *, base: Path) -> list[int]:
    """The index of each image's top-level subfolder of `base`, among the sorted subfolder names."""
    tops = []
    for path in paths:
        parts = Path(os.path.relpath(path, base)).parts
        if len(parts) < 2 or parts[0] == os.pardir:
            raise DataError(f"--unbalanced needs one subfolder per class in {base}, and {path} is not in one; drop "
                            "--unbalanced, or put each class's images in DATA/<class>/")
        tops.append(parts[0])
    names = sorted(set(tops))
    index = {name: i for i, name in enumerate(names)}
    return [index[top] for top in tops]


class Selected(Dataset):
    """Items `indices` of a dataset, in that order (for datasets of no kind `select` rebuilds)."""

    def __init__(self, source: Dataset, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[self.indices[index]]


def select(images: Dataset, indices: Sequence[int]) -> Dataset:
    """Items `indices` of `images`, as the same kind of dataset where there is one (image files keep their paths,
    for bad-file reports and the data's fingerprint; shards their samples)."""
    if isinstance(images, ImageFiles):
        return ImageFiles([images.paths[i] for i in indices], max_pixels=images.max_pixels,
                          skipped_folders=images.skipped_folders)
    if isinstance(images, shards.ShardImages):
        return shards.ShardImages(images.shards, [images.samples[i] for i in indices], max_pixels=images.max_pixels)
    return Selected(images, indices)
