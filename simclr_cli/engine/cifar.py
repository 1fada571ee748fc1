"""CIFAR-10/100 from the official BINARY versions, read with NumPy: the python versions torchvision reads are
pickles, which are never loaded. Fixed-size records: a label (1 byte, or 2 for CIFAR-100's coarse and fine), then
1024 R, 1024 G and 1024 B bytes of a row-major 32x32 image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from simclr_cli.engine.errors import DataError

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


def cifar_binary(name: str, root: Path, *, split: str, download: bool) -> CifarImages:
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
