"""Sharded datasets: tar files in the WebDataset layout (the files of one sample share a key: `KEY.jpg`, `KEY.cls`),
written from a folder by `simclr shard` and read by pretrain and embed.

Reading is map-style: the tar headers are indexed once (shard, key, member offset, size) and a sample is one seek
and one read, so the epoch sampler, the split across processes and workers, the pixel cache and bit-exact resume
work on shards as they do on a folder. That needs seekable storage (a local or mounted filesystem), not a stream
from object storage, and uncompressed tar files. The standard library's `tarfile` reads and writes them: a
`webdataset` dependency would bring an iterable (streaming) dataset that the sampler and resume cannot index.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from simclr_cli.engine.errors import BadImage, ConfigError, DataError
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_bytes, decode_image, printable_path,
                                      scan_folder)

log = logging.getLogger("simclr")

SHARD_NAME = "shard-{:06d}.tar"
CLASSES_FILE = "classes.txt"  # beside the shards when the folder had class subfolders: line i names class i
INDEX_HEADER = "# simclr shard index v1"
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
OPEN_SHARDS = 64  # open files per process: random access touches every shard, and 1,000s would pass the fd limit
JPEG_QUALITY = 95  # a re-encoded (shrunk) JPEG: close to the original, a fraction of its bytes


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000000..000146}.tar` -> the 147 names (zero-padded as the first bound is); `{a,b}` -> each choice.
    Several groups expand left to right, as a shell does."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    inside = match.group(1)
    if (numbers := _RANGE.match(inside)) is not None:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ConfigError(f"the range {{{inside}}} in {pattern!r} runs backwards; write it as {{{last}..{first}}}")
        width = len(first) if first.startswith("0") else 1
        choices = [f"{n:0{width}d}" for n in range(int(first), int(last) + 1)]
    else:
        choices = inside.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def is_shard_source(data: str | os.PathLike) -> bool:
    """Whether DATA names shards: a .tar file, a brace pattern of them, or a folder with .tar files and neither
    images nor subfolders (a folder of images with a stray archive beside its class folders stays a folder)."""
    text = os.fspath(data)
    if text.endswith(".tar") or (_BRACES.search(text) and ".tar" in text):
        return True
    folder = Path(text).expanduser()
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        visible = [entry for entry in entries if not entry.name.startswith(".")]
    return (any(e.name.endswith(".tar") for e in visible) and not any(e.is_dir() for e in visible)
            and not any(os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in visible))


def shard_files(data: str | os.PathLike) -> list[Path]:
    """The tar files DATA names, in order: a folder's sorted .tar files, a brace pattern's expansion, or one file."""
    text = os.fspath(data)
    folder = Path(text).expanduser()
    if folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
    else:
        paths = [Path(name).expanduser() for name in expand_braces(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"shard {printable_path(missing[0])} does not exist{more}; check the path or the {{first..last}} range")
    return [p.resolve() for p in paths]


@dataclass(frozen=True)
class Sample:
    """One sample's image member: bytes [offset, offset + size) of shard `shard`."""

    shard: int
    key: str
    ext: str
    offset: int
    size: int


def split_name(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its file name, the rest its extension."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_shards(paths: Sequence[Path]) -> list[Sample]:
    """Every sample with an image member, in shard then tar order (headers only: tarfile seeks past the data).
    A sample without an image member (or a key with a line break or tab, which the saved index cannot hold) is
    left out with a warning."""
    samples: list[Sample] = []
    for number, path in enumerate(paths):
        left_out = 0
        try:
            with tarfile.open(path, mode="r:") as tar:
                images: dict[str, Sample] = {}
                keys: set[str] = set()
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_name(member.name)
                    keys.add(key)
                    if "." + ext.lower() in IMAGE_EXTENSIONS and key not in images and not re.search(r"[\t\r\n]", key):
                        images[key] = Sample(number, key, ext, member.offset_data, member.size)
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot read the shard {printable_path(path)} ({exc}); shards must be uncompressed .tar files "
                            "(write them with `simclr shard`)") from None
        samples += images.values()
        left_out = len(keys) - len(images)
        if left_out:
            log.warning("%s: %d sample(s) have no image member and are left out", printable_path(path), left_out)
    if not samples:
        raise DataError(f"the {len(paths)} shard(s) hold no images (first: {printable_path(paths[0])}); "
                        f"write shards with `simclr shard FOLDER -o OUT`")
    return samples


class SampleNames(Sequence[str]):
    """`shard.tar:key` of each sample, made when asked (a million of them need not sit in memory as strings)."""

    def __init__(self, shards: Sequence[Path], samples: Sequence[Sample]) -> None:
        self.shards, self.samples = shards, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        sample = self.samples[index]
        return f"{self.shards[sample.shard]}:{sample.key}"


class ShardImages(Dataset):
    """Item i: sample i's decoded PIL RGB image (BadImage when it cannot be); `paths[i]` names it `shard.tar:key`."""

    def __init__(self, shards: Sequence[Path], samples: Sequence[Sample], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.shards = [Path(p) for p in shards]
        self.samples = list(samples)
        self.paths = SampleNames(self.shards, self.samples)
        self.keys = [s.key for s in self.samples]
        self.max_pixels = max_pixels
        self.min_side: int | None = None  # see images.decoded_at_least
        self._open: OrderedDict[int, Any] = OrderedDict()  # the most recently used last
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Image.Image:
        data = self.read_bytes(index)
        return decode_bytes(data, name=self.paths[index], max_pixels=self.max_pixels, min_side=self.min_side)

    def read_bytes(self, index: int) -> bytes:
        """Sample i's encoded image bytes (BadImage when the shard cannot be read)."""
        sample = self.samples[index]
        name = self.paths[index]
        try:
            handle = self._handle(sample.shard)
            handle.seek(sample.offset)
            data = handle.read(sample.size)
        except OSError as exc:
            raise BadImage(f"cannot read the shard ({exc.strerror or exc})", path=name) from exc
        if len(data) != sample.size:
            raise BadImage("truncated shard (the member ends past the end of the file)", path=name)
        return data

    def _handle(self, shard: int):
        """An open file per shard and process, at most OPEN_SHARDS of them (the least recently used is closed); a
        forked DataLoader worker opens its own, never sharing a file offset with another process."""
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) >= OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        handle = self._open[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open for the next sample
        return handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}  # spawned workers open their own files

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the samples (datasets.fingerprint): each shard's name and size, each sample's key and place."""
        digest = hashlib.sha256()
        for path in self.shards:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            digest.update(os.fsencode(path.name) + b"\0" + str(size).encode() + b"\n")
        for s in self.samples:
            digest.update(f"{s.shard}\t{s.key}\t{s.ext}\t{s.offset}\t{s.size}\n".encode("utf-8", "surrogateescape"))
        return {"count": len(self.samples), "shards": len(self.shards), "sha256": digest.hexdigest()}


def open_shards(data: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                saved_index: Path | None = None) -> ShardImages:
    """The samples of the shards DATA names; an existing `saved_index` (a run's, on --resume) is read instead of the
    tar headers."""
    if saved_index is not None and saved_index.is_file():
        shards, samples = read_index(saved_index)
        log.info("using the %d samples indexed in %s (delete it to index the shards again)", len(samples),
                 printable_path(saved_index))
        return ShardImages(shards, samples, max_pixels=max_pixels)
    shards = shard_files(data)
    return ShardImages(shards, index_shards(shards), max_pixels=max_pixels)


def write_index(path: Path, images: ShardImages) -> None:
    """The shard index as text: a header, one `shard PATH` line per shard, then `shard key ext offset size` (tabs)."""
    lines = [INDEX_HEADER + "\n"]
    lines += [f"shard\t{os.fspath(p)}\n" for p in images.shards]
    lines += [f"{s.shard}\t{s.key}\t{s.ext}\t{s.offset}\t{s.size}\n" for s in images.samples]
    text = "".join(lines)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape", newline="\n"))


def read_index(path: Path) -> tuple[list[Path], list[Sample]]:
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
    if not lines or lines[0] != INDEX_HEADER:
        raise DataError(f"{printable_path(path)} is not a shard index; delete it to index the shards again")
    shards: list[Path] = []
    samples: list[Sample] = []
    try:
        for line in lines[1:]:
            if not line:
                continue
            fields = line.split("\t")
            if fields[0] == "shard":
                shards.append(Path(fields[1]))
            else:
                samples.append(Sample(int(fields[0]), fields[1], fields[2], int(fields[3]), int(fields[4])))
    except (IndexError, ValueError):
        raise DataError(f"{printable_path(path)} is damaged (line {line[:60]!r}); delete it to index the shards again") from None
    return shards, samples


@dataclass(frozen=True)
class ShardResult:
    out: Path
    shards: list[Path]
    samples: int
    resized: int  # images re-encoded because their longer side was over max_side
    skipped: list[tuple[str, str]]  # (relative path, reason) of files that could not be read
    classes: list[str]


def write_shards(folder: Path, out: Path, *, shard_size: int, max_side: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = False) -> ShardResult:
    """The images of `folder` (walk order) as OUT/shard-000000.tar, ... with `shard_size` samples each. A sample is
    `KEY.EXT` (the file's bytes, or re-encoded with its longer side shrunk to `max_side` when it is larger), plus
    `KEY.cls` (the class index) when every image lies in a class subfolder. The key is the file's path relative to
    the folder without its extension (dots in the name become `_`). Each shard is written atomically; member times
    and owners are fixed, so the same folder gives the same bytes. Shards already in OUT are refused, or with
    `overwrite` removed first (a stale shard-000009.tar would otherwise join a set of 5)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size} must be >= 1 (samples per shard; a few thousand is typical)")
    if max_side is not None and max_side < 8:
        raise ConfigError(f"--max-side {max_side} must be >= 8 pixels, or left out to keep the images' size")
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    old = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise ConfigError(f"{printable_path(out)} already holds shards ({old[0].name}, ...); pass --overwrite to replace "
                          "them, or choose another -o")
    images = scan_folder(folder, exclude=out).images
    for path in old:
        path.unlink()
    relative = [p.relative_to(folder).as_posix() for p in images]
    classes = sorted({r.split("/", 1)[0] for r in relative}) if all("/" in r for r in relative) else []
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    skipped: list[tuple[str, str]] = []
    written: list[Path] = []
    resized = count = 0
    batch: list[tuple[str, str, bytes, int | None]] = []

    def flush() -> None:
        path = out / SHARD_NAME.format(len(written))
        atomic_write(path, lambda tmp: _write_tar(tmp, batch))
        written.append(path)
        batch.clear()

    for path, name in zip(images, relative):
        try:
            data, ext, shrunk = _sample_bytes(path, max_side=max_side, max_pixels=max_pixels)
        except BadImage as exc:
            log.warning("leaving out %s: %s", printable_path(path), exc.reason)
            skipped.append((name, exc.reason))
            continue
        key = _unique_key(name, used)
        batch.append((key, ext, data, classes.index(name.split("/", 1)[0]) if classes else None))
        resized += shrunk
        count += 1
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    if not written:
        raise DataError(f"none of the {len(images)} images under {printable_path(folder)} could be read; check the files")
    if classes:
        text = "".join(f"{c}\n" for c in classes)
        atomic_write(out / CLASSES_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
    return ShardResult(out, written, count, resized, skipped, classes)


def _unique_key(name: str, used: set[str]) -> str:
    folder, _, base = name.rpartition("/")
    stem = os.path.splitext(base)[0].replace(".", "_")
    key = f"{folder}/{stem}" if folder else stem
    candidate, n = key, 1
    while candidate in used:  # a.b.jpg and a_b.png would share a key
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def _sample_bytes(path: Path, *, max_side: int | None, max_pixels: int | None) -> tuple[bytes, str, bool]:
    """(bytes, extension, re-encoded?) of one image: the file as it is, or shrunk when its longer side is over max_side."""
    ext = path.suffix.lstrip(".")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or exc})", path=path) from exc
    image = decode_image(path, max_pixels=max_pixels)  # a bad file is left out here, not found while training
    if max_side is None or max(image.size) <= max_side:
        return data, ext, False
    image.thumbnail((max_side, max_side), Image.BICUBIC)  # aspect kept: the longer side becomes max_side
    buffer = io.BytesIO()
    if ext.lower() in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
        ext = "png"
    return buffer.getvalue(), ext, True


def _write_tar(path: Path, samples: Sequence[tuple[str, str, bytes, int | None]]) -> None:
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, data, label in samples:
            _add(tar, f"{key}.{ext}", data)
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed times and owners: the same folder, the same bytes
    tar.addfile(info, io.BytesIO(data))
