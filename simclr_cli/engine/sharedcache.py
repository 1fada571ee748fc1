"""One decoded-image cache per machine: a file in shared memory (/dev/shm) that the machine's training processes fill
together, each writing the images of its own share, and then all map, so the pixels are held once, not once per
process (8 copies on an 8-GPU machine before).

Layout: a header page; an index of (offset, height, width) int64 per image, offset -1 for an image not cached; then
the data region, one slot of `slot_bytes` per local process (a sparse file: a slot costs only what is written in it).
The header holds what makes a file trustworthy: the format, a digest of the key naming the run and its data, the image
count, the process and host that created it, and a flag set only once every share is written. The file is unlinked as
soon as every local process has mapped it, so its memory goes back to the system when the last process exits, however
it exits; a file found under the name is a leftover of a run killed while filling and is replaced, never read.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("simclr")

SHM_DIR = Path("/dev/shm")
PREFIX = "simclr-pixels-"
MAGIC = b"SIMCLRPX"
VERSION = 1
HEADER_BYTES = mmap.PAGESIZE
ENTRY = 3  # int64 fields per image in the index: offset in the data region (-1: not cached), height, width
_HEADER = struct.Struct("<8sIIqqqq32s64s")  # magic, version, complete, pid, count, slots, slot_bytes, key digest, host


class StaleSegment(Exception):
    """A segment that must not be read: not ours, not complete, or not the size its header says."""


@dataclass(frozen=True)
class Header:
    digest: bytes  # sha256 of the key naming the run and its data
    count: int  # images in the dataset (index entries)
    slots: int  # local processes, one data slot each
    slot_bytes: int
    pid: int  # the process that created the file, on `host`
    host: str
    complete: bool = False  # every share written and its index entries with it

    @property
    def data_start(self) -> int:
        return HEADER_BYTES + _round_up(self.count * ENTRY * 8, mmap.PAGESIZE)

    @property
    def size(self) -> int:
        return self.data_start + self.slots * self.slot_bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, int(self.complete), self.pid, self.count, self.slots, self.slot_bytes,
                            self.digest, self.host.encode()[:64])

    @classmethod
    def unpack(cls, raw: bytes) -> Header | None:
        """The header in `raw`, None when it is not one of this format and version."""
        if len(raw) < _HEADER.size:
            return None
        magic, version, complete, pid, count, slots, slot_bytes, digest, host = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            return None
        return cls(digest=digest, count=count, slots=slots, slot_bytes=slot_bytes, pid=pid,
                   host=host.rstrip(b"\0").decode(errors="replace"), complete=bool(complete))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def segment_path(key: str, *, node: int, shm_dir: Path = SHM_DIR) -> Path:
    """The segment's name: from the key (the run and its data) and the node, so simulated nodes on one host differ."""
    return Path(shm_dir) / f"{PREFIX}{digest(key).hex()[:24]}-node{node}"


def free_bytes(shm_dir: Path = SHM_DIR) -> int | None:
    """Bytes free in the shared-memory folder; None where there is none this process can write (macOS, some sandboxes)."""
    if not os.path.isdir(shm_dir) or not os.access(shm_dir, os.W_OK | os.X_OK):
        return None
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def create(path: Path, *, key: str, count: int, slots: int, slot_bytes: int) -> Header:
    """On the node's first process: a new, incomplete segment under `path` (a leftover there is replaced), every
    index entry "not cached"."""
    header = Header(digest=digest(key), count=count, slots=slots, slot_bytes=slot_bytes, pid=os.getpid(),
                    host=socket.gethostname())
    if path.exists():
        log.info("replacing %s, left by a run killed while filling it", path)
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, header.pack(), 0)
        os.ftruncate(fd, header.size)  # sparse: a slot takes memory only where pixels are written
        _write_index(fd, header, first=0, entries=np.full((count, ENTRY), -1, dtype=np.int64))
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return header


def _write_index(fd: int, header: Header, *, first: int, entries: np.ndarray) -> None:
    _pwrite_all(fd, np.ascontiguousarray(entries, dtype="<i8").tobytes(), HEADER_BYTES + first * ENTRY * 8)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Writer:
    """One process's share: its images appended to its slot with pwrite (a full /dev/shm is an ENOSPC error here, not
    a SIGBUS in a mapping), and its index entries written at `close`."""

    def __init__(self, path: Path, *, key: str, slot: int, share: range) -> None:
        self.fd = os.open(path, os.O_RDWR)
        header = _read_header(self.fd)
        if header is None or header.digest != digest(key):
            os.close(self.fd)
            raise StaleSegment(f"{path} is not the segment this run created")
        self.header, self.share = header, share
        self.start = slot * header.slot_bytes  # in the data region
        self.used = 0
        self.entries = np.full((len(share), ENTRY), -1, dtype=np.int64)
        self.full: str | None = None  # why the slot took no more images

    def put(self, index: int, pixels: Tensor) -> bool:
        """Write image `index` (3, H, W) uint8; False (and nothing written) once the slot or /dev/shm is full."""
        nbytes = pixels.numel()
        if self.full is not None:
            return False
        if self.used + nbytes > self.header.slot_bytes:
            self.full = "budget"
            return False
        try:
            _pwrite_all(self.fd, pixels.contiguous().numpy().reshape(-1).data, self.header.data_start + self.start + self.used)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self.full = "shared memory"
            return False
        self.entries[index - self.share.start] = (self.start + self.used, pixels.shape[1], pixels.shape[2])
        self.used += nbytes
        return True

    def close(self) -> None:
        try:
            _write_index(self.fd, self.header, first=self.share.start, entries=self.entries)
        finally:
            os.close(self.fd)


def seal(path: Path, *, key: str) -> None:
    """On the node's first process, once every share is written: mark the segment complete."""
    fd = os.open(path, os.O_RDWR)
    try:
        header = _read_header(fd)
        if header is None or header.digest != digest(key):
            raise StaleSegment(f"{path} is not the segment this run created")
        os.pwrite(fd, replace(header, complete=True).pack(), 0)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Mapped:
    """A complete segment mapped into this process: views into one shared mapping, no copies."""

    index: Tensor  # (N, 3) int64: offset, height, width
    data: Tensor  # (slots * slot_bytes,) uint8
    path: Path


def open_segment(path: Path, *, key: str, count: int) -> Mapped:
    """Map the segment at `path` after checking it is the complete one for `key` and `count`; StaleSegment if not."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise StaleSegment(f"cannot open {path} ({exc.strerror or exc})") from None
    try:
        header, size = _read_header(fd), os.fstat(fd).st_size
    finally:
        os.close(fd)
    if header is None:
        raise StaleSegment(f"{path} has no valid header")
    if header.digest != digest(key) or header.count != count:
        raise StaleSegment(f"{path} holds another run's or another dataset's images")
    if not header.complete:
        raise StaleSegment(f"{path} was never completed (its run stopped while filling it)")
    if size != header.size:
        raise StaleSegment(f"{path} is {size} bytes, its header says {header.size}")
    whole = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)  # MAP_SHARED: one copy per machine
    index = whole[HEADER_BYTES : HEADER_BYTES + count * ENTRY * 8].view(torch.int64).view(count, ENTRY)
    return Mapped(index=index, data=whole[header.data_start :], path=path)


def _read_header(fd: int) -> Header | None:
    return Header.unpack(os.pread(fd, _HEADER.size, 0))


def sweep(shm_dir: Path = SHM_DIR) -> int:
    """Remove the segments whose creating process on this host is gone (runs killed while filling); the bytes freed."""
    freed, host = 0, socket.gethostname()
    for path in Path(shm_dir).glob(f"{PREFIX}*"):
        try:
            with open(path, "rb") as handle:
                header = Header.unpack(handle.read(_HEADER.size))
            if header is None or header.host != host or _alive(header.pid):
                continue
            blocks = os.stat(path).st_blocks * 512
            path.unlink()
        except OSError:
            continue  # another user's, or removed meanwhile
        freed += blocks
        log.info("removed %s, left in shared memory by a stopped run (%.1f MB)", path, blocks / 1024**2)
    return freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
