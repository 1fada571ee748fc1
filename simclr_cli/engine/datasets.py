"""Datasets: labelled folders, the named datasets (digits, CIFAR, STL-10, ImageNet) and labelled train/val splits.

Every dataset yields PIL RGB images (with an int label when labelled); transforms are applied by
the consumers that need them (`pipeline.PixelDataset` for pretraining, the eval transforms), so one dataset serves both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from simclr_cli.engine.errors import BadImage, DataError, one_line
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS, ImageFiles, decode_image, printable_path, scan_folder, walk_images

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
CIFAR_SIZE = 32
CIFAR_PIXEL_BYTES = 3 * CIFAR_SIZE * CIFAR_SIZE  # 1024 R, then 1024 G, then 1024 B, each row-major 32x32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR binary version lives and how its fixed-size records are laid out."""

    folder: str  # what the official archive extracts to
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # the label read is the last of these (CIFAR-100: coarse byte, then fine byte)
    classes_file: str
    num_classes: int

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + CIFAR_PIXEL_BYTES

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def fix(self) -> str:
        return (
            f"pass --data-root DIR holding the extracted binary version ({self.folder}/), "
            "or --download where you have internet"
        )


# The BINARY versions, read with numpy: the python versions torchvision reads are pickles, which we never load.
CIFAR_BINARY = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-bin",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        md5="c32a1d4ab5d03f1284b67883e8d87530",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",),
        label_bytes=1,
        classes_file="batches.meta.txt",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-binary",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        md5="03b5dce01913d631647c71ecec9e9cb8",
        train_files=("train.bin",),
        test_files=("test.bin",),
        label_bytes=2,
        classes_file="fine_label_names.txt",
        num_classes=100,
    ),
}

log = logging.getLogger("simclr")

log = logging.getLogger("simclr")


class LabelledImages(Dataset):
    """(PIL RGB, int label) pairs from files or in-memory images; `classes[label]` names the class."""

    def __init__(self, samples: Sequence[tuple[Path | Image.Image, int]], classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [int(label) for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.samples[index]
        if isinstance(image, Image.Image):
            return (image if image.mode == "RGB" else image.convert("RGB")), self.targets[index]
        try:
            return decode_image(image), self.targets[index]
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


class CifarImages(Dataset):
    """CIFAR held as one uint8 array (N, 32, 32, 3); item i is (PIL RGB, int label)."""

    def __init__(self, images: np.ndarray, *, classes: Sequence[str], targets: Sequence[int]) -> None:
        self.images = images
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


def _cifar_binary(name: str, root: Path, *, split: str, download: bool) -> CifarImages:
    """CIFAR-10/100 from the official binary version; `root` is the extracted folder or its parent."""
    layout = CIFAR_BINARY[name]
    folder = root / layout.folder
    if not folder.is_dir() and (root / layout.classes_file).is_file():
        folder = root  # root is the extracted folder itself (perhaps renamed), known by its class-names file
    if not folder.is_dir() and download:
        from torchvision.datasets import utils as tv_utils  # lazy: only downloads need it

        tv_utils.download_and_extract_archive(layout.url, download_root=str(root), md5=layout.md5)
    if not folder.is_dir():
        pickled = sorted(root.glob("cifar-*-py*")) if root.is_dir() else []
        note = f" ({pickled[0].name}/ is the python-pickle version, which is never loaded)" if pickled else ""
        raise DataError(f"{name}: expected folder {folder} is missing{note}; {layout.fix}")
    classes = _cifar_classes(folder / layout.classes_file, layout=layout, name=name)
    files = layout.train_files if split == "train" else layout.test_files
    images, labels = [], []
    for filename in files:
        batch_images, batch_labels = _read_cifar_records(folder / filename, layout=layout, name=name)
        images.append(batch_images)
        labels.append(batch_labels)
    return CifarImages(np.concatenate(images), classes=classes, targets=np.concatenate(labels).tolist())


def _cifar_classes(path: Path, *, layout: CifarLayout, name: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{name}: class-names file {path} is missing; {layout.fix}")
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]  # the file ends in blank lines
    if len(classes) != layout.num_classes:
        raise DataError(
            f"{name}: {path} names {len(classes)} classes, not {layout.num_classes}; "
            f"re-extract {layout.archive} or pass --data-root DIR holding an intact copy"
        )
    return classes


def _read_cifar_records(path: Path, *, layout: CifarLayout, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as images (n, 32, 32, 3) uint8 and labels (n,) int64."""
    archive = layout.archive
    if not path.is_file():
        raise DataError(f"{name}: batch file {path} is missing; re-extract {archive} there, or {layout.fix}")
    size = path.stat().st_size
    if size == 0 or size % layout.record_bytes:
        raise DataError(
            f"{name}: {path} is {size} bytes, not a whole number of {layout.record_bytes}-byte records (truncated?); "
            f"re-extract {archive}, or delete {path.parent} and pass --download"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, layout.record_bytes)  # (n, label_bytes + 3072)
    labels = records[:, layout.label_bytes - 1].astype(np.int64)  # (n,)
    if labels.max() >= layout.num_classes:
        raise DataError(
            f"{name}: {path} has label {labels.max()} but only {layout.num_classes} classes (not a {name} file?); "
            f"re-extract {archive}, or delete {path.parent} and pass --download"
        )
    pixels = records[:, layout.label_bytes :].reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)  # (n, C, H, W)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)), labels  # (n, H, W, C) for PIL


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
    fix = CIFAR_BINARY[name].fix if name in CIFAR_BINARY else DATA_FIX
    if not download and not root.is_dir():
        raise DataError(f"{name}: data root {root} does not exist; {fix}")
    try:
        if name == "imagenet":
            return _imagenet(root, split=split)
        if name in CIFAR_BINARY:
            return _cifar_binary(name, root, split=split, download=download)
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
        raise DataError(
            f"imagenet: {root} has neither the devkit layout (meta.bin) nor a {split}/ folder of class subfolders; "
            "pass --data-root DIR holding the extracted dataset (ImageNet cannot be downloaded for you: "
            "it needs a licence from image-net.org)"
        )
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
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Dataset:
    """Pretraining images: None -> digits (all); a name -> its pretraining split; else a folder of images."""
    if data is None:
        data = "digits"
    if isinstance(data, str) and data in NAMED_DATASETS:
        return Unlabelled(named_dataset(data, root=root, split=PRETRAIN_SPLITS[data], download=download))
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"DATA {str(data)!r} is neither a dataset name nor an existing folder; "
            f"use one of {', '.join(NAMED_DATASETS)}, or the path of a folder of images"
        )
    scan = scan_folder(path)
    return ImageFiles(scan.images, max_pixels=max_pixels, skipped_folders=scan.skipped_folders)


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
