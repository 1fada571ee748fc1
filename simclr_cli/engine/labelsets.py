"""Which training images keep their labels in semi-supervised runs (`finetune`, `distill --labels-weight`): a
class-balanced, seed-deterministic fraction, or the images a label file lists (SimCLR §4.2, SimCLRv2 §2)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from simclr_cli.engine.errors import DataError


def class_balanced_subset(labels: Sequence[int], fraction: float, *, seed: int) -> list[int]:
    """Sorted indices of round(fraction * n_c) items of every class c (at least 1), drawn with `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for c in np.unique(labels):  # sorted class order, so each class's draw depends only on the seed
        members = np.flatnonzero(labels == c)
        count = max(1, round(fraction * len(members)))
        chosen.append(rng.permutation(members)[:count])
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


def image_paths(dataset: Dataset) -> list[Path]:
    """The file behind every item of a labelled image folder (DataError for in-memory or named datasets)."""
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        samples = getattr(candidate, "samples", None)
        if samples is not None and len(samples) == len(dataset) and all(isinstance(s[0], (str, os.PathLike)) for s in samples):
            return [Path(s[0]) for s in samples]
    raise DataError("--label-file needs the training images as files in a folder; this training set has no file paths")


def label_file_subset(label_file: Path, paths: Sequence[Path], *, root: Path) -> list[int]:
    """Sorted indices of the images a label file lists (one path a line, relative to `root`; blank lines and
    '#' comments skipped); DataError naming the lines that are not images of the set."""
    label_file = Path(label_file)
    try:
        lines = label_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read label file {label_file} ({exc}); pass a text file with one image path a line") from exc
    index = {os.path.normpath(p): i for i, p in enumerate(paths)}
    chosen, unknown = set(), []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        i = index.get(os.path.normpath(Path(root) / entry))  # an absolute entry replaces root
        if i is None:
            unknown.append(f"line {number} '{entry}'")
        else:
            chosen.add(i)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise DataError(
            f"label file {label_file}: {shown} not found among the training images under {root}; "
            "list image paths relative to the train folder, one per line"
        )
    if not chosen:
        raise DataError(f"label file {label_file} lists no images; put one training image path on each line")
    return sorted(chosen)
