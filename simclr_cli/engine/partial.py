"""An unfinished `simclr embed`, kept beside its output so that a stopped or killed run continues where it stopped
(`simclr embed ... --resume`) instead of starting again.

For VECS.npy:
- `.VECS.npy.partial.npy`: the (N, D) float32 rows. Its header is written once, for the final N, before any row,
  so the file is a valid .npy from its first moment (rows not computed yet are zeros) and no header is ever
  rewritten: growing the header with each chunk would leave a window where a kill makes header and data
  disagree, and rewriting it atomically means copying the whole file each time.
- `.VECS.npy.partial.json`: the run's settings (rows, dim, encoder digest, layer, normalisation), written once.
- `.VECS.npy.partial.rankR.json`: what process R has done: the rows it wrote and the files it could not decode.
  Rewritten atomically after each chunk, once the chunk's rows are on disk (fdatasync), so it never claims a row
  the .npy does not hold; rows written after the last record are simply written again on resume.
- the images in row order (the caller's listing, `listing_file`), so a resumed run neither searches the folder
  again nor sees files added since.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.images import printable_path

FORMAT = 1
Runs = list[list[int]]  # [[start, stop), ...] ascending, disjoint, not touching


class PartialRows:
    """The unfinished rows of one --out and their progress files."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.rows_file = self.out.parent / f".{self.out.name}.partial.npy"
        self.settings_file = self.out.parent / f".{self.out.name}.partial.json"

    def listing_file(self, suffix: str) -> Path:
        """Where the images' order is kept: `.VECS.npy.partial.files.txt` or `.partial.shards.tsv`."""
        return self.out.parent / f".{self.out.name}.partial.{suffix}"

    def progress_file(self, rank: int) -> Path:
        return self.out.parent / f".{self.out.name}.partial.rank{rank}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold `.VECS.npy.partial.lock` for the block, so that two runs to one --out never write one unfinished file
        (an exclusive flock: the kernel drops it however the holder ends, so none is ever stale)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        path = self.out.parent / f".{self.out.name}.partial.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another simclr embed is writing to {self.out}; wait for it to finish or choose another "
                              "--out") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def exists(self) -> bool:
        return self.settings_file.is_file() and self.rows_file.is_file()

    def files(self) -> list[Path]:
        """Every file of this partial run that is on disk."""
        pattern = re.compile(re.escape(f".{self.out.name}.partial.") + r"(npy|json|rank\d+\.json|files\.txt|shards\.tsv)$")
        try:
            return [p for p in self.out.parent.iterdir() if pattern.match(p.name)]
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)

    def create(self, *, rows: int, dim: int, settings: dict[str, Any], write_listing: Callable[[], None]) -> None:
        """Start afresh: a (rows, dim) .npy of zeros (sparse where the filesystem allows), the images' order
        (`write_listing`) and the settings, last: a stop before them leaves nothing that `exists`."""
        self.remove()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        created = open_memmap(self.rows_file, mode="w+", dtype=np.float32, shape=(rows, dim))  # (N, D)
        created.flush()
        del created
        write_listing()
        text = json.dumps({"format": FORMAT, "rows": rows, "dim": dim, **settings}, indent=2, ensure_ascii=True)
        atomic_write(self.settings_file, lambda tmp: tmp.write_text(text + "\n", encoding="ascii"))

    def settings(self) -> dict[str, Any]:
        """What `create` was given, checked against the rows file."""
        try:
            settings = json.loads(self.settings_file.read_text(encoding="ascii"))
            rows = np.load(self.rows_file, mmap_mode="r", allow_pickle=False)  # (N, D)
        except (OSError, ValueError) as exc:
            raise DataError(f"the unfinished embed {printable_path(self.settings_file)} cannot be read ({exc}); "
                            "pass --overwrite to start again") from None
        if not isinstance(settings, dict) or settings.get("format") != FORMAT or \
                rows.shape != (settings.get("rows"), settings.get("dim")):
            raise DataError(f"the unfinished embed {printable_path(self.settings_file)} does not match its rows file "
                            f"{printable_path(self.rows_file)}; pass --overwrite to start again")
        return settings

    def progress(self) -> tuple[Runs, list[tuple[int, str]]]:
        """The rows every process recorded as written (merged runs) and the (row, reason) of every file that could
        not be decoded, in row order."""
        done: Runs = []
        unreadable: dict[int, str] = {}
        for path in self._progress_files():
            try:
                record = json.loads(path.read_text(encoding="ascii"))
                runs = [[int(a), int(b)] for a, b in record["done"]]
                failed = [(int(i), str(reason)) for i, reason in record["unreadable"]]
            except (OSError, ValueError, KeyError, TypeError):
                raise DataError(f"{printable_path(path)} is damaged; pass --overwrite to start the embed again") from None
            done = merge_runs(done, runs)
            unreadable.update(failed)
        return done, sorted(unreadable.items())

    def gather_progress(self) -> None:
        """Rank 0, before the ranks of a resumed run start: every earlier process's record as rank 0's, so that a run
        resumed with fewer processes reads no stale record of a rank it no longer has."""
        done, unreadable = self.progress()
        self.record(0, done=done, unreadable=unreadable, handle=None)
        for path in self._progress_files():
            if path != self.progress_file(0):
                path.unlink()

    def record(self, rank: int, *, done: Runs, unreadable: Iterable[tuple[int, str]], handle) -> None:
        """Process `rank` has written the rows `done` (through the open rows file `handle`, flushed to disk first)."""
        if handle is not None:
            handle.flush()
            os.fdatasync(handle.fileno())
        # ensure_ascii escapes the surrogates of undecodable names, so the reasons round-trip exactly
        text = json.dumps({"done": done, "unreadable": [[i, reason] for i, reason in unreadable]}, ensure_ascii=True)
        atomic_write(self.progress_file(rank), lambda tmp: tmp.write_text(text, encoding="ascii"))

    def _progress_files(self) -> list[Path]:
        pattern = re.compile(re.escape(f".{self.out.name}.partial.rank") + r"\d+\.json$")
        return sorted(p for p in self.out.parent.iterdir() if pattern.match(p.name))


def merge_runs(a: Runs, b: Runs) -> Runs:
    """The union of two lists of [start, stop) runs, as sorted, disjoint, non-touching runs."""
    merged: Runs = []
    for start, stop in sorted([*a, *b]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        elif stop > start:
            merged.append([start, stop])
    return merged


def runs_of(indices: Iterable[int]) -> Runs:
    """Ascending indices as [start, stop) runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    runs: Runs = []
    for i in indices:
        if runs and i == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return runs


def missing(count: int, done: Runs) -> np.ndarray:
    """The rows of range(count) that no run in `done` covers, ascending."""
    todo = np.ones(count, dtype=bool)
    for start, stop in done:
        todo[start:stop] = False
    return np.flatnonzero(todo)
