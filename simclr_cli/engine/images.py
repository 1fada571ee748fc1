"""Image files in: discovery (a recursive walk that follows symlinks safely) and decoding with explicit rules.

Every image comes out as a PIL RGB image; datasets and pipelines build on these two functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from simclr_cli.engine.errors import BadImage, DataError, one_line
from simclr_cli.engine.files import atomic_write

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


def scan_folder(root: Path, *, exclude: Path | None = None) -> FolderScan:
    """`find_images`, with the subfolders that were skipped (each already logged as a warning); the folder `exclude`
    (a run's own output folder inside the data) is left out."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; point DATA at a folder of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; point DATA at a folder of images (subfolders are searched too)")
    scan = walk_images(root, exclude=exclude)
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


DISCOVERY_THREADS = 16  # folder listings in flight: a network filesystem answers many at once, a local disk does not mind
PROGRESS_SECONDS = 5.0  # between "found so far" log lines while a walk runs


@dataclass(frozen=True)
class _Listing:
    """One folder's entries, as a worker thread read them: what the walk decides on, without touching the disk."""

    folders: list[tuple[str, tuple[int, int] | OSError]]  # sorted visible subfolders: (st_dev, st_ino) or why stat failed
    images: list[str]  # sorted visible image file names
    error: OSError | None = None  # the folder itself could not be read


def _list_folder(folder: Path) -> _Listing:
    dirs, files = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows symlinks, as the walk does
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(entry.name)
    except OSError as exc:
        return _Listing([], [], exc)
    folders: list[tuple[str, tuple[int, int] | OSError]] = []
    # Hidden entries (.git, macOS "._x.jpg" resource forks) are never training images.
    for name in sorted(d for d in dirs if not d.startswith(".")):
        try:
            info = os.stat(folder / name)
            folders.append((name, (info.st_dev, info.st_ino)))
        except OSError as exc:
            folders.append((name, exc))
    images = sorted(n for n in files if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return _Listing(folders, images)


def walk_images(root: Path, *, exclude: Path | None = None, threads: int = DISCOVERY_THREADS) -> FolderScan:
    """Every image under `root` in sorted, top-down order (a folder's files, then each subfolder's in name order).

    Folders are listed by `threads` worker threads ahead of the walk (on a network filesystem a listing is a round
    trip); the walk itself, which decides the order, the skips and the symlink rules, runs here, one folder at a
    time, so the result is the same for any number of threads. A line is logged every PROGRESS_SECONDS.
    """
    root = Path(root)
    images: list[Path] = []
    excluded: tuple[int, int] | None = None
    if exclude is not None:
        with contextlib.suppress(OSError):  # a run folder not made yet holds nothing to leave out
            info = os.stat(exclude)
            excluded = (info.st_dev, info.st_ino)
    skipped: list[tuple[Path, str]] = []

    def skip(folder: Path, reason: str) -> None:
        log.warning("skipping folder %s: %s", printable_path(folder), reason)
        skipped.append((folder, reason))

    def unreadable(error: OSError, folder: Path) -> None:
        skip(Path(error.filename) if error.filename else folder, f"cannot read the folder ({error.strerror or error})")

    # Symlinked folders are followed; each real folder (st_dev, st_ino) is walked once, so a link back up the
    # tree (a loop) or a second link to the same folder is skipped instead of walked forever or twice.
    walked: dict[tuple[int, int], Path] = {}
    with contextlib.suppress(OSError):  # an unreadable root is reported when it is listed
        info = os.stat(root)
        walked[(info.st_dev, info.st_ino)] = root
    progress = _WalkProgress(root)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="simclr-discovery") as pool:
        pending = [(root, pool.submit(_list_folder, root))]  # a stack: the next folder in walk order is on top
        while pending:
            here, listed = pending.pop()
            listing = progress.wait(listed, images=len(images))
            if listing.error is not None:
                unreadable(listing.error, here)
                continue
            kept = []
            for name, identity in listing.folders:
                folder = here / name
                if isinstance(identity, OSError):
                    unreadable(identity, folder)
                elif identity == excluded:
                    log.info("leaving out %s: the run's own output folder is not training data", printable_path(folder))
                elif (first := walked.setdefault(identity, folder)) == folder:
                    kept.append(folder)
                elif first in folder.parents:
                    skip(folder, f"symlink loop back to {printable_path(first)}")
                else:
                    skip(folder, f"the same folder as {printable_path(first)}, walked there")
            images.extend(here / name for name in listing.images)
            pending.extend((folder, pool.submit(_list_folder, folder)) for folder in reversed(kept))
    progress.done(images=len(images))
    return FolderScan(images, skipped)


class _WalkProgress:
    """The walk's log lines: one every PROGRESS_SECONDS while it runs (so a long listing is never a silent pause),
    and a total at the end of a walk that took that long."""

    def __init__(self, root: Path) -> None:
        self.root = printable_path(root)
        self.started = self.last = time.monotonic()
        self.folders = 0

    def wait(self, listed: Future, *, images: int) -> _Listing:
        while True:
            try:
                listing = listed.result(timeout=PROGRESS_SECONDS)
                break
            except FutureTimeout:
                self._report(images)
        self.folders += 1
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self._report(images)
        return listing

    def _report(self, images: int) -> None:
        self.last = time.monotonic()
        log.info("looking for images under %s: %d found in %d folders so far (%.0f s)", self.root, images, self.folders,
                 self.last - self.started)

    def done(self, *, images: int) -> None:
        seconds = time.monotonic() - self.started
        (log.info if seconds >= PROGRESS_SECONDS else log.debug)(
            "found %d images in %d folders under %s in %.1f s", images, self.folders, self.root, seconds)


def read_file_list(list_file: Path, *, base: Path, check: bool = True) -> list[Path]:
    """The images a file list names, in its order: one path a line (UTF-8; other bytes as `write_file_list` wrote
    them), relative to `base` or absolute; blank lines are ignored. With `check`, a listed file that does not exist
    is a DataError naming it and its line (one stat per file, no pixels read)."""
    list_file = Path(list_file).expanduser()
    try:
        text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read the file list {printable_path(list_file)} ({exc.strerror or exc}); "
                        "pass a text file with one image path a line") from None
    paths = []
    for number, line in enumerate(text.split("\n"), start=1):
        name = line.removesuffix("\r")
        if not name.strip():
            continue
        path = base / name  # an absolute name stays absolute
        if check and not os.path.exists(path):
            raise DataError(f"{printable_path(list_file)} line {number}: {printable_path(path)} does not exist; "
                            f"fix the list (relative paths start at {printable_path(base)})")
        paths.append(path)
    if not paths:
        raise DataError(f"the file list {printable_path(list_file)} names no images; put one image path on each line")
    return paths


def write_file_list(list_file: Path, images: Sequence[Path], *, base: Path) -> bool:
    """Save `images` as `read_file_list` reads them, relative to `base` where they lie below it; False (nothing
    written) when a name holds a line break, which a one-path-a-line list cannot."""
    prefix = os.path.join(os.fspath(base), "")
    names = [name[len(prefix):] if name.startswith(prefix) else name for name in map(os.fspath, images)]
    if any("\n" in name or "\r" in name for name in names):
        log.info("not saving the image list in %s: a file name holds a line break", printable_path(list_file))
        return False
    text = "".join(f"{name}\n" for name in names)
    atomic_write(list_file, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape", newline="\n"))
    return True


def decode_image(path: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """The one image decoder: 8-bit RGB, EXIF orientation applied, frame 0 of an animation, the file closed.

    Only ACCEPTED_FORMATS, as PIL detects them from the bytes (not the extension). Transparency is composited on
    white (BACKGROUND: how a logo or scan looks on a page). 16-bit and 32-bit integer grey (PNG, TIFF) keep their
    levels, v -> round(v / 257); 16-bit colour keeps PIL's high byte; float grey in [0, 1] is scaled by 255, other
    float ranges are stretched min..max. Images over `max_pixels` are refused from the header, before any pixel
    is decoded (None: no limit; whoever passes None must log that). With `min_side`, a JPEG is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose short side still has `min_side` pixels, for a caller that shrinks it to
    that size anyway: a 12-megapixel photo wanted at 448 px decodes 1/16 of its pixels. Every failure is a BadImage
    naming the reason.
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
    return _decode(path, path=path, max_pixels=max_pixels, min_side=min_side)


def read_image_file(path: Path) -> bytes:
    """The bytes of the image file `path`, by decode_image's rules for what a file must be (BadImage if not)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BadImage("not a regular file", path=path)
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or exc})", path=path) from exc
    if not data:
        raise BadImage("empty file (0 bytes)", path=path)
    return data


EXIF_ORIENTATION = 0x0112


def plain_jpeg_pixels(data: bytes, *, max_pixels: int | None) -> int | None:
    """The pixel count of a JPEG any decoder turns into the same image as decode_image: 8-bit colour or grey, no EXIF
    rotation, within `max_pixels` (read from the header); None for everything else (other formats, CMYK, rotated,
    too large, broken), which only decode_image handles by its rules."""
    with _PIL_BOMB_CHECK.off():
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("RGB", "L") or width < 1 or height < 1:
                    return None
                if max_pixels is not None and width * height > max_pixels:
                    return None
                if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    return None
                return width * height
        except Exception:  # noqa: BLE001 - whatever PIL makes of it, decode_image will name the problem
            return None


def decode_bytes(data: bytes, *, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """`decode_image` for an image held in memory (a member of a tar shard): the same rules, the same BadImage
    reasons, `name` standing for the file in messages."""
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels {max_pixels} must be >= 1, or None for no limit")
    if not data:
        raise BadImage("empty file (0 bytes)", path=name)
    return _decode(io.BytesIO(data), path=name, max_pixels=max_pixels, min_side=min_side)


def _decode(source: Path | io.BytesIO, *, path: Path | str, max_pixels: int | None, min_side: int | None) -> Image.Image:
    size = None
    with _PIL_BOMB_CHECK.off():
        try:
            with Image.open(source, formats=ACCEPTED_FORMATS) as img:
                size = img.size
                _check_pixels(img.size, max_pixels, path=path)  # the header's size, whatever is decoded below
                if min_side is not None:
                    # A square request: both sides stay >= min_side, so the short side does, however EXIF turns it.
                    img.draft("RGB", (min_side, min_side))  # JPEG only; other formats ignore it
                img.load()  # frame 0: an animation opens on its first frame
                return _to_rgb(ImageOps.exif_transpose(img))
        except BadImage:
            raise
        except UnidentifiedImageError as exc:
            raise BadImage(_unaccepted(source), path=path) from exc
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


def _unaccepted(source: Path | io.BytesIO) -> str:
    """Why PIL, limited to ACCEPTED_FORMATS, found no image: a broken header of one of them, another format, or none."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
            head = source.read(16)
            source.seek(0)
        else:
            with open(source, "rb") as file:
                head = file.read(16)
        claimed = next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)
        if claimed is not None:
            return f"truncated or corrupt {claimed} header"
        with Image.open(source) as img:
            found = img.format
    except Exception:  # noqa: BLE001 - whatever fails here, the file is not an image we could name
        return "not an image"
    return f"format {found} is not accepted" if found else "not an image"


def _failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read the file ({exc.strerror or exc})"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated file"
    return f"corrupt file ({one_line(exc)})"


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
        self.min_side: int | None = None  # see decoded_at_least

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], max_pixels=self.max_pixels, min_side=self.min_side)

    def read_bytes(self, index: int) -> bytes:
        """Image i's encoded bytes, for a decoder of its own (BadImage when the file cannot be read)."""
        return read_image_file(self.paths[index])


def decoded_at_least(images: Dataset, side: int | None) -> Dataset:
    """`images` with its JPEGs decoded at a reduced scale whose short side still covers `side` px (decode_image's
    `min_side`), for a consumer that shrinks every image to that size: a copy when `images` decodes files
    (ImageFiles, datasets.LabelledImages), else `images` itself (pixels already in memory)."""
    if side is None or not hasattr(images, "min_side"):
        return images
    reduced = copy.copy(images)  # the caller's dataset keeps decoding at full size
    reduced.min_side = side
    return reduced
