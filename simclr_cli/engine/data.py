"""Images in: discovery, decoding, datasets (folder, labelled folder, named) and the epoch sampler.

Every dataset yields PIL RGB images (with an int label when labelled); transforms are applied by
the wrappers that need them (`TwoViewDataset`), so one dataset serves pretraining and evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from simclr_cli.engine.errors import DataError

if TYPE_CHECKING:
    from simclr_cli.engine.augment import TwoViews

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # any letter case
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
_MASK64 = (1 << 64) - 1

log = logging.getLogger("simclr")


def find_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in a deterministic (sorted, top-down) order."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; point DATA at a folder of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; point DATA at a folder of images (subfolders are searched too)")
    paths = _walk_images(root)
    if not paths:
        raise DataError(
            f"{root} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in any letter case, "
            "in subfolders too); point DATA at a folder of images"
        )
    return paths


def _walk_images(root: Path) -> list[Path]:
    paths = []
    # Symlinked folders are not followed: a link back up the tree would loop forever.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Hidden entries (.git, macOS "._x.jpg" resource forks) are never training images.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(Path(dirpath) / name)
    return paths


def decode_image(path: Path) -> Image.Image:
    """The one image decoder: RGB, EXIF orientation applied, pixels loaded so the file is closed."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
        img = img.convert("RGB")
        img.load()
    return img


class ImageFiles(Dataset):
    """Unlabelled image files: item i is the decoded PIL RGB image of paths[i]."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return decode_image(self.paths[index])


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
        return decode_image(image), self.targets[index]


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
        paths = _walk_images(root / name)
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
        raise DataError(f"{name} ({split}) could not be loaded from {root} ({_one_line(exc)}); {fix}") from exc


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


def pretrain_dataset(data: str | Path | None, *, root: Path | None, download: bool) -> Dataset:
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
    return ImageFiles(find_images(path))


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixing several ints (SplitMix64 finaliser), stable across processes unlike hash()."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


BAD_IMAGE_POLICIES = ("skip", "error")
# What decoding a broken file raises: PIL's UnidentifiedImageError is an OSError, truncated files raise OSError,
# some corrupt headers ValueError or SyntaxError, oversized images DecompressionBombError.
UNDECODABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class TwoViewDataset(Dataset):
    """Item (index, epoch) -> the two SimCLR views of image `index`, a pure function of (seed, epoch, index).

    An image that cannot be decoded is, with `on_bad_image="skip"`, replaced by the next decodable one, so
    every batch keeps its size (and every process its batch count); with "error" it stops the run, named.
    """

    def __init__(self, images: Dataset, transform: TwoViews, *, seed: int, on_bad_image: str = "skip") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.images = images
        self.transform = transform
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.reported: set[int] = set()  # per process: each bad file is named once by each worker

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = key
        image = self._decodable(index)
        # Seed only the CPU generator, inside a fork so the caller's (or worker's) RNG stream is untouched;
        # the views then do not depend on which process or DataLoader worker draws them.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image)

    def _decodable(self, index: int) -> Image.Image:
        for offset in range(len(self.images)):
            candidate = (index + offset) % len(self.images)
            try:
                return self.images[candidate]
            except UNDECODABLE as exc:
                name = self._name(candidate)
                if self.on_bad_image == "error":
                    raise DataError(f"cannot decode {name} ({_one_line(exc)}); fix or remove it, or pass --on-bad-image skip") from exc
                if candidate not in self.reported:
                    self.reported.add(candidate)
                    log.warning("skipping %s: %s", name, _one_line(exc))
        raise DataError("none of the images can be decoded; check the files")

    def _name(self, index: int) -> str:
        paths = getattr(self.images, "paths", None)
        return str(paths[index]) if paths is not None else f"image {index}"


class EpochSampler(Sampler):
    """Yields (index, epoch): a (seed, epoch)-seeded permutation in whole global batches, this rank's chunk of each.

    The ranks' chunks concatenated in rank order are exactly the one-process batch, so the batches do not
    depend on the number of processes; `start_batch` skips the epoch's first global batches (resume mid-epoch).
    """

    def __init__(self, num_samples: int, *, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}; need 0 <= rank < world_size")
        if global_batch_size < 1 or global_batch_size % world_size != 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the number of processes "
                f"({world_size}); change the batch size or the process count"
            )
        if global_batch_size > num_samples:
            raise ValueError(
                f"global_batch_size {global_batch_size} is larger than the dataset ({num_samples} images); "
                "use a smaller batch size or more data"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch; the incomplete last batch is dropped (NT-Xent wants full batches)."""
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch} (batches per epoch)")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        lo = self.rank * self.local_batch_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch_size + lo
            for index in order[first : first + self.local_batch_size]:
                yield index, self.epoch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch_size


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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
