"""Datasets: labelled folders, the named datasets (digits, CIFAR, STL-10, ImageNet) and labelled train/val splits.

Every dataset yields PIL RGB images (with an int label when labelled); transforms are applied by
the consumers that need them (`pipeline.PixelDataset` for pretraining, the eval transforms), so one dataset serves both.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from simclr_cli.engine.cifar import CIFAR_BINARY, cifar_binary
from simclr_cli.engine.errors import BadImage, DataError, one_line
from simclr_cli.engine import shards
from simclr_cli.engine.images import (DEFAULT_MAX_PIXELS, ImageFiles, decode_image, printable_path, read_file_list, scan_folder,
                                      walk_images)

NAMED_DATASETS = ("digits", "cifar10", "cifar100", "stl10", "imagenet")
PRETRAIN_SPLITS = {
    "digits": "all",
    "cifar10": "train",
    "cifar100": "train",
    "stl10": "train+unlabeled",  # the 100k unlabelled images are what STL-10 is for
    "imagenet": "train",
}
SPLITS = {
    "digits": ("train", "val", "all"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "imagenet": ("train", "val"),
}
# Tasks ask for "train" and an evaluation split; each dataset names the latter its own way.
SPLIT_ALIASES = {
    "digits": {"test": "val"},
    "cifar10": {"val": "test"},
    "cifar100": {"val": "test"},
    "stl10": {"val": "test"},
    "imagenet": {"test": "val"},
}
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DATA_FIX = "pass --data-root DIR holding the extracted dataset, or --download where you have internet"
IMAGENET_FIX = ("pass --data-root DIR holding the extracted ImageNet: the devkit layout (meta.bin), or train/ and val/ "
                "with one subfolder per class (it cannot be downloaded for you: it needs a licence from image-net.org)")


log = logging.getLogger("simclr")


class LabelledImages(Dataset):
    """(PIL RGB, int label) pairs from files or in-memory images; `classes[label]` names the class."""

    def __init__(self, samples: Sequence[tuple[Path | Image.Image, int]], classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [int(label) for _, label in self.samples]
        self.min_side: int | None = None  # see images.decoded_at_least

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.samples[index]
        if isinstance(image, Image.Image):
            return (image if image.mode == "RGB" else image.convert("RGB")), self.targets[index]
        try:
            return decode_image(image, min_side=self.min_side), self.targets[index]
        except BadImage as exc:  # a labelled set is not skipped silently: the score would be over other images
            raise DataError(f"cannot decode {printable_path(image)} ({exc.reason}); fix or remove it from the labelled data") from exc


def labelled_folder(root: Path) -> LabelledImages:
    """A class-per-subfolder tree (root/<class>/**/<image>); classes in sorted name order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"labelled data folder {root} does not exist; point it at a folder with one subfolder per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; put each class's images in root/<class name>/")
    samples = []
    for label, name in enumerate(classes):
        paths = walk_images(root / name).images
        if not paths:
            raise DataError(f"class folder {root / name} has no images; add images or remove the folder")
        samples += [(path, label) for path in paths]
    return LabelledImages(samples, classes)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import and only digits needs it

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    images = np.repeat(images[..., None], 3, axis=-1)  # (1797, 8, 8, 3) grey as RGB
    return images, bunch.target.astype(np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of a fixed, seeded, class-stratified 80/20 train/val split of the 1797 digits."""
    if split not in SPLITS["digits"]:
        raise DataError(f"digits split {split!r} does not exist; choose one of {', '.join(SPLITS['digits'])}")
    _, labels = _digits_arrays()
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.Generator(np.random.PCG64(DIGITS_SPLIT_SEED))
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        val.append(rng.permutation(members)[: round(DIGITS_VAL_FRACTION * len(members))])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val)] = True
    return np.flatnonzero(is_val if split == "val" else ~is_val)


def digits(split: str) -> LabelledImages:
    """scikit-learn's bundled 8x8 handwritten digits as RGB PIL images (the offline smoke-test dataset)."""
    images, labels = _digits_arrays()
    indices = digits_split_indices(split)
    samples = [(Image.fromarray(images[i]), int(labels[i])) for i in indices]
    return LabelledImages(samples, [str(d) for d in range(10)])


class _TorchvisionImages(Dataset):
    """A torchvision dataset seen as (PIL RGB, int label) with `classes` and `targets`."""

    def __init__(self, dataset: Dataset, *, classes: Sequence[str], targets: Sequence[int]) -> None:
        self.dataset = dataset
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[index]
        return (image if image.mode == "RGB" else image.convert("RGB")), int(label)


def default_data_root() -> Path:
    """Where named datasets live when --data-root is not given: $XDG_CACHE_HOME/simclr/datasets."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "simclr" / "datasets"


def named_dataset(name: str, *, root: Path | None, split: str, download: bool) -> Dataset:
    """A dataset by name as (PIL RGB, label); `root` holds its files (default: `default_data_root()`)."""
    if name not in NAMED_DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(NAMED_DATASETS)}, or pass a folder")
    split = SPLIT_ALIASES[name].get(split, split)
    if split not in SPLITS[name]:
        raise DataError(f"{name} has no split {split!r}; choose one of {', '.join(SPLITS[name])}")
    if name == "digits":
        return digits(split)
    root = Path(root).expanduser() if root is not None else default_data_root()
    fix = CIFAR_BINARY[name].fix if name in CIFAR_BINARY else IMAGENET_FIX if name == "imagenet" else DATA_FIX
    if not download and not root.is_dir():
        raise DataError(f"{name}: data root {root} does not exist; {fix}")
    try:
        if name == "imagenet":
            return _imagenet(root, split=split)
        if name in CIFAR_BINARY:
            return cifar_binary(name, root, split=split, download=download)
        import torchvision.datasets as tvd  # lazy: only named datasets need it

        dataset = tvd.STL10(str(root), split=split, download=download)
        classes = getattr(dataset, "classes", STL10_CLASSES)  # set only when class_names.txt is present
        return _TorchvisionImages(dataset, classes=classes, targets=dataset.labels)
    except DataError:
        raise
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found or corrupted", failed downloads, bad md5
        if not download and "not found" in str(exc):
            raise DataError(f"{name} ({split}) files are missing or corrupt in {root}; {fix}") from exc
        raise DataError(f"{name} ({split}) could not be loaded from {root} ({one_line(exc)}); {fix}") from exc


def _imagenet(root: Path, *, split: str) -> Dataset:
    """torchvision's ImageNet when root has the devkit layout, else an ImageFolder-style root/train, root/val."""
    if (root / "meta.bin").is_file() or (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        import torchvision.datasets as tvd

        dataset = tvd.ImageNet(str(root), split=split, loader=decode_image)
        # wnids are unique folder names (some human-readable names repeat, e.g. "crane").
        return _TorchvisionImages(dataset, classes=dataset.wnids, targets=dataset.targets)
    if not (root / split).is_dir():
        raise DataError(f"imagenet: {root} has neither the devkit layout (meta.bin) nor a {split}/ folder of class subfolders; "
                        f"{IMAGENET_FIX}")
    return labelled_folder(root / split)


class Unlabelled(Dataset):
    """A labelled dataset with the labels dropped: item i is its image."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:
        return self.dataset[index][0]


def pretrain_dataset(data: str | Path | None, *, root: Path | None, download: bool,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, exclude: Path | None = None,
                     file_list: str | Path | None = None, saved_list: Path | None = None,
                     saved_index: Path | None = None) -> Dataset:
    """Pretraining images: None -> digits (all); a name -> its pretraining split; tar shards (shards.is_shard_source)
    -> their samples; else a folder of images, without the folder `exclude` (the run's own output folder, when it
    lies inside the data). `file_list` names the images instead of a search of the folder (relative to it, or
    absolute); an existing `saved_list` (the list a run saved, on --resume) is read instead of searching again, an
    existing `saved_index` (a run's shard index) instead of reading the tar headers."""
    if file_list is not None and (data is None or (isinstance(data, str) and data in NAMED_DATASETS)):
        raise DataError("--file-list needs DATA, the folder its relative paths start from (`.` for the current folder)")
    if data is None:
        data = "digits"
    if isinstance(data, str) and data in NAMED_DATASETS:
        return Unlabelled(named_dataset(data, root=root, split=PRETRAIN_SPLITS[data], download=download))
    if file_list is None and shards.is_shard_source(data):
        return shards.open_shards(data, max_pixels=max_pixels, saved_index=saved_index)
    path = Path(data).expanduser()
    if saved_list is not None and saved_list.is_file():
        images = read_file_list(saved_list, base=path, check=False)  # --resume checks the data's fingerprint instead
        log.info("using the %d images listed in %s (delete it to search %s again)", len(images), printable_path(saved_list),
                 printable_path(path))
        return ImageFiles(images, max_pixels=max_pixels)
    if file_list is not None:
        return ImageFiles(read_file_list(Path(file_list), base=path), max_pixels=max_pixels)
    if not path.exists():
        raise DataError(
            f"DATA {str(data)!r} is neither a dataset name nor an existing folder; "
            f"use one of {', '.join(NAMED_DATASETS)}, or the path of a folder of images"
        )
    scan = scan_folder(path, exclude=exclude)
    return ImageFiles(scan.images, max_pixels=max_pixels, skipped_folders=scan.skipped_folders)


def fingerprint(images: Dataset, *, data: str | Path | None) -> dict[str, Any]:
    """What identifies the image list a run trains on: the count and, for a folder, a SHA-256 of every image's path
    relative to the folder and its size in bytes (no pixels read), so `--resume` notices images added, removed or
    replaced; shards say what identifies them (shards.ShardImages.fingerprint)."""
    if isinstance(images, shards.ShardImages):
        return images.fingerprint()
    paths = getattr(images, "paths", None)
    if paths is None:  # a named dataset, already pixels in memory: its name and split fix the list
        return {"count": len(images), "source": str(data if data is not None else "digits")}
    base = Path(data).expanduser()
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1  # unreadable now: reported as a bad image when drawn
        digest.update(os.fsencode(os.path.relpath(path, base)) + b"\0" + str(size).encode() + b"\n")
    return {"count": len(paths), "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class LabelledSplits:
    """A labelled train split and an evaluation split with the same classes."""

    name: str  # a dataset name or the folder(s) it came from, for reports
    train: Dataset
    val: Dataset
    classes: list[str]


def labelled_splits(
    data: str | None, *, train: Path | None = None, val: Path | None = None, root: Path | None = None, download: bool = False
) -> LabelledSplits:
    """Labelled data for evaluation: a dataset name, a folder holding train/ and val/ (or test/), or --train/--val."""
    if (train is None) != (val is None):
        raise DataError("pass both --train DIR and --val DIR (class-per-subfolder folders), or --data instead")
    if train is not None and val is not None:
        if data is not None:
            raise DataError("pass either --data or --train/--val, not both")
        splits = LabelledSplits(f"{train} | {val}", labelled_folder(train), labelled_folder(val), [])
    elif data is None:
        raise DataError(f"no labelled data given; pass --data NAME ({', '.join(NAMED_DATASETS)}) or --data DIR with train/ and val/")
    elif data in NAMED_DATASETS:
        splits = LabelledSplits(
            data,
            named_dataset(data, root=root, split="train", download=download),
            named_dataset(data, root=root, split="val", download=download),
            [],
        )
    else:
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data {data!r} is neither a dataset name ({', '.join(NAMED_DATASETS)}) nor a folder")
        held_out = next((folder / name for name in ("val", "test") if (folder / name).is_dir()), None)
        if not (folder / "train").is_dir() or held_out is None:
            raise DataError(
                f"{folder} needs train/ and val/ (or test/) subfolders, each with one folder per class; "
                "or pass --train DIR --val DIR"
            )
        splits = LabelledSplits(str(folder), labelled_folder(folder / "train"), labelled_folder(held_out), [])
    train_classes, val_classes = list(splits.train.classes), list(splits.val.classes)
    if train_classes != val_classes:
        missing = sorted(set(train_classes) ^ set(val_classes))
        raise DataError(
            f"train and val have different classes ({', '.join(missing[:5]) or 'same names, other order'}); "
            "give both the same class subfolders"
        )
    return replace(splits, classes=train_classes)
