"""Images in: discovery, decoding, datasets (folder, labelled folder, named) and the epoch sampler.

Every dataset yields PIL RGB images (with an int label when labelled); transforms are applied by
the consumers that need them (`pipeline.PixelDataset` for pretraining, the eval transforms), so one dataset serves both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from simclr_cli.engine import seeds
from simclr_cli.engine.errors import BadImage, DataError

if TYPE_CHECKING:
    pass

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # any letter case
# What decode_image reads, as PIL names the format it detects from the bytes (JPEG includes a camera's
# multi-picture MPO, which PIL opens as a JPEG).
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# Where PIL itself refuses (twice its warning level): 178,956,970 px, e.g. 13,377 x 13,377, ~0.5 GB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
# Leading bytes of the accepted formats, only to word why a file PIL cannot open is bad.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF"}
_CONTROL_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)}, 9: "\\t", 10: "\\n", 13: "\\r"}
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


def printable_path(path: str | os.PathLike) -> str:
    """`path` as one line any log, terminal or message can show: bytes that are not UTF-8 and control characters
    become backslash escapes (the exact name stays `os.fsencode(path)`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


@dataclass(frozen=True)
class FolderScan:
    """What a recursive walk found: the image files in walk order, and the folders it skipped, with why."""

    images: list[Path]
    skipped_folders: list[tuple[Path, str]]  # unreadable folders, symlink loops, second links to a walked folder


def find_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in a deterministic (sorted, top-down) order."""
    return scan_folder(root).images


def scan_folder(root: Path) -> FolderScan:
    """`find_images`, with the subfolders that were skipped (each already logged as a warning)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; point DATA at a folder of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; point DATA at a folder of images (subfolders are searched too)")
    scan = _walk_images(root)
    if not scan.images:
        unread = next((reason for folder, reason in scan.skipped_folders if folder == root), None)
        if unread is not None:
            raise DataError(f"{printable_path(root)}: {unread}; check its permissions, or point DATA at another folder")
        skipped = f"; {len(scan.skipped_folders)} subfolder(s) were skipped (see the warnings)" if scan.skipped_folders else ""
        raise DataError(
            f"{printable_path(root)} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in any letter case, "
            f"in subfolders too{skipped}); point DATA at a folder of images"
        )
    return scan


def _walk_images(root: Path) -> FolderScan:
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def skip(folder: Path, reason: str) -> None:
        log.warning("skipping folder %s: %s", printable_path(folder), reason)
        skipped.append((folder, reason))

    def unreadable(error: OSError) -> None:
        skip(Path(error.filename) if error.filename else root, f"cannot read the folder ({error.strerror or error})")

    # Symlinked folders are followed; each real folder (st_dev, st_ino) is walked once, so a link back up the
    # tree (a loop) or a second link to the same folder is skipped instead of walked forever or twice.
    walked: dict[tuple[int, int], Path] = {}
    with contextlib.suppress(OSError):  # an unreadable root is reported by os.walk's onerror below
        info = os.stat(root)
        walked[(info.st_dev, info.st_ino)] = root
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        kept = []
        # Hidden entries (.git, macOS "._x.jpg" resource forks) are never training images.
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            folder = here / name
            try:
                info = os.stat(folder)
            except OSError as exc:
                unreadable(exc)
                continue
            first = walked.setdefault((info.st_dev, info.st_ino), folder)
            if first == folder:
                kept.append(name)
            elif first in folder.parents:
                skip(folder, f"symlink loop back to {printable_path(first)}")
            else:
                skip(folder, f"the same folder as {printable_path(first)}, walked there")
        dirnames[:] = kept
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(here / name)
    return FolderScan(images, skipped)


def decode_image(path: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The one image decoder: 8-bit RGB, EXIF orientation applied, frame 0 of an animation, the file closed.

    Only ACCEPTED_FORMATS, as PIL detects them from the bytes (not the extension). Transparency is composited on
    white (BACKGROUND: how a logo or scan looks on a page). 16-bit and 32-bit integer grey (PNG, TIFF) keep their
    levels, v -> round(v / 257); 16-bit colour keeps PIL's high byte; float grey in [0, 1] is scaled by 255, other
    float ranges are stretched min..max. Images over `max_pixels` are refused from the header, before any pixel
    is decoded (None: no limit; whoever passes None must log that). Every failure is a BadImage naming the reason.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels {max_pixels} must be >= 1, or None for no limit")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or exc})", path=path) from exc
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not a regular file", path=path)  # a FIFO named x.jpg would block the reader forever
    if info.st_size == 0:
        raise BadImage("empty file (0 bytes)", path=path)
    size = None
    with _PIL_BOMB_CHECK.off():
        try:
            with Image.open(path, formats=ACCEPTED_FORMATS) as img:
                size = img.size
                _check_pixels(img.size, max_pixels, path=path)
                img.load()  # frame 0: an animation opens on its first frame
                return _to_rgb(ImageOps.exif_transpose(img))
        except BadImage:
            raise
        except UnidentifiedImageError as exc:
            raise BadImage(_unaccepted(path), path=path) from exc
        except MemoryError:  # not this file's fault alone (the machine's memory is), so a stop, not a skip
            raise DataError(_out_of_memory(path, size, max_pixels)) from None
        # PIL's plugins raise a zoo for hostile bytes (OSError, ValueError, SyntaxError, EOFError, struct.error,
        # IndexError, ...): whichever it is, this one file is unusable.
        except Exception as exc:  # noqa: BLE001
            raise BadImage(_failure(exc), path=path) from exc


def _check_pixels(size: tuple[int, int], max_pixels: int | None, *, path: Path) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadImage(f"no pixels ({width}x{height})", path=path)
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(
            f"{width}x{height} = {_pixel_count(width * height)} exceeds the {_pixel_count(max_pixels)} limit; "
            "raise --max-image-pixels",
            path=path,
        )


def _out_of_memory(path: Path, size: tuple[int, int] | None, max_pixels: int | None) -> str:
    what = f"its {size[0]}x{size[1]} = {_pixel_count(size[0] * size[1])}" if size else "it"
    fix = ("the pixel limit is off (--max-image-pixels 0): set a limit to skip such images" if max_pixels is None
           else "lower --max-image-pixels to skip such images")
    return f"decoding {printable_path(path)} ran out of memory ({what}); {fix}, or remove the file"


def _pixel_count(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 100_000 else f"{pixels} px"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB by the rules in decode_image's docstring."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_grey_levels(np.asarray(img)))  # (H, W) uint8: mode L
    if img.has_transparency_data:  # RGBA, LA, PA, or a palette / grey / RGB image with a transparent colour
        flat = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(flat, img.convert("RGBA"))
    return img.convert("RGB")  # CMYK by PIL's (255 - C)(255 - K) / 255; 1-bit as 0 / 255


def _grey_levels(values: np.ndarray) -> np.ndarray:
    """(H, W) 16/32-bit integer or float grey as (H, W) uint8."""
    if values.dtype.kind in "iu":
        levels = np.clip(values.astype(np.int64), 0, 65535)
        return ((levels + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, so there are no ties
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if low < 0.0 or high > 1.0:  # not intensities in [0, 1]: no scale to trust, use the range it has
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.where(finite, np.rint(np.clip(values, 0.0, 1.0) * 255), 0).astype(np.uint8)  # NaN, inf: black


def _unaccepted(path: Path) -> str:
    """Why PIL, limited to ACCEPTED_FORMATS, found no image: a broken header of one of them, another format, or none."""
    try:
        with open(path, "rb") as file:
            head = file.read(16)
        claimed = next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)
        if claimed is not None:
            return f"truncated or corrupt {claimed} header"
        with Image.open(path) as img:
            found = img.format
    except Exception:  # noqa: BLE001 - whatever fails here, the file is not an image we could name
        return "not an image"
    return f"format {found} is not accepted" if found else "not an image"


def _failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read the file ({exc.strerror or exc})"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated file"
    return f"corrupt file ({_one_line(exc)})"


class _PilBombCheck:
    """PIL's own decompression-bomb check, switched off while decode_image applies ours.

    PIL reads the global Image.MAX_IMAGE_PIXELS at each check (on open, on GIF frames, on TIFF tiles), so it would
    warn at half our default and refuse what a raised --max-image-pixels allows. The global is restored as soon as
    no decode is running, so code outside decode_image keeps PIL's behaviour; the count makes decodes overlapping
    in threads restore it once, not each to the other's value.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._saved: int | None = None

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_PIL_BOMB_CHECK = _PilBombCheck()


class ImageFiles(Dataset):
    """Unlabelled image files: item i is the decoded PIL RGB image of paths[i] (BadImage when it cannot be)."""

    def __init__(self, paths: Sequence[Path], *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 skipped_folders: Sequence[tuple[Path, str]] = ()) -> None:
        self.paths = [Path(p) for p in paths]
        self.max_pixels = max_pixels
        self.skipped_folders = list(skipped_folders)  # what the walk could not enter, for the bad-files report

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], max_pixels=self.max_pixels)


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
        paths = _walk_images(root / name).images
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


class EpochSampler(Sampler):
    """Yields dataset indices: a (seed, epoch)-seeded permutation in whole global batches, this rank's chunk of each.

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

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(seeds.mix(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        lo = self.rank * self.local_batch_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch_size + lo
            yield from order[first : first + self.local_batch_size]

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
