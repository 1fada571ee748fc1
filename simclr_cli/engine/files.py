"""Files written so that a crash never leaves a torn one: temp file, fsync, rename, fsync the folder.

The machine's refusals (full disk, quota, read-only, permissions) become OutputError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from simclr_cli.engine.errors import ConfigError, OutputError


# atomic_write's temp files: `.<name>.<pid>.<8 hex digits>.tmp`; one left behind was a save cut short (kill -9)
TEMP_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


def atomic_write(path: Path, write: Callable[[Path], None], *, replace: bool = True) -> None:
    """Write through a temp file in the same folder, fsync it, rename it over `path`, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never a torn one. A full disk, a quota,
    a read-only or forbidden folder raise OutputError naming `path`; the temp file is removed and the old one
    stays as it was. With `replace=False` the file is created only if `path` does not exist, atomically
    (a hard link, which fails when it does): FileExistsError (`filename2` is `path`) then, and whoever made `path`
    meanwhile keeps it.
    """
    path = Path(path)
    kept = f"the previous {path.name} is intact" if os.path.lexists(path) else "nothing was written"
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 mode would survive the rename; created like any file, the umask decides.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors does) would leave it 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())  # a network file system may report ENOSPC only here
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only disk there is nothing to remove
            tmp.unlink(missing_ok=True)
        code = _errno_of(exc)
        if code in OutputError.CAUSES:
            raise OutputError(path, code, kept=kept) from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link_new(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` only if `path` does not exist (FileExistsError), atomically where hard links exist."""
    try:
        os.link(tmp, path)  # EEXIST when `path` exists, whoever created it and however late
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some FUSE mounts): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(tmp), None, str(path)) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


@contextlib.contextmanager
def writing(path: Path, *, kept: str) -> Iterator[None]:
    """For writes that cannot go through `atomic_write` (appending a line to a log): the machine's refusals
    (full disk, quota, read-only, permissions) as OutputError naming `path` and saying what `kept` is intact."""
    try:
        yield
    except OSError as exc:
        if exc.errno in OutputError.CAUSES:
            raise OutputError(path, exc.errno, kept=kept) from exc
        raise


def check_output_file(path: Path, *, overwrite: bool, sidecars: tuple[Path, ...] = ()) -> None:
    """Before any work: ConfigError when `path` (or a sidecar written with it) is a folder, or already exists without
    `overwrite`; OutputError when its folder cannot be created or written to. A long run then never ends in a
    refusal to write its result."""
    path = Path(path)
    for target in (path, *sidecars):
        if target.is_dir():
            raise ConfigError(f"--out {target} is a folder; give the path of the file to write")
        if os.path.lexists(target) and not overwrite:
            raise ConfigError(f"{target} already exists; pass --overwrite to replace it, or choose another --out")
    _check_can_create(path.parent, target=path)


def check_output_folder(folder: Path) -> None:
    """Before any work: ConfigError when `folder` is a file, OutputError when it cannot be created or written to."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a folder; choose another --out")
    _check_can_create(folder, target=folder)


def _check_can_create(folder: Path, *, target: Path) -> None:
    """`folder` exists and is writable, or its nearest existing parent is a writable folder it can be made in."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, so {target} cannot be created in it; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise OutputError(target, errno.EROFS if read_only else errno.EACCES, kept="nothing was written")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, or the one safetensors' Rust writer only puts in its
    message ("I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):
        match = _RUST_OS_ERROR.search(str(exc))
        return int(match[1]) if match else None
    return None
