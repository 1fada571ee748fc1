"""`simclr embed`: one feature row per image of a folder, as an N x D float32 .npy plus a sidecar of paths.

Rows are written to a memory-mapped .npy as they are computed, so a folder larger than RAM works.
Undecodable files are skipped and reported; they are only discovered while reading, so the rows go to a
scratch file sized for every image found, and when some were skipped the decodable rows are copied into
a file of the right size (one extra sequential pass, only then). A cheap pre-scan (PIL open + verify)
was rejected: it opens every file twice and still misses files that verify but fail to decode.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from simclr_cli.engine.checkpoint import atomic_write
from simclr_cli.engine.data import decode_image, find_images
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.features import Encoder, encode, layer_dim, loader, prepare, transform_for
from simclr_cli.engine.report import NoProgress, Progress, StepStats

log = logging.getLogger("simclr")

COPY_ROWS = 65536  # rows per block when copying the decodable rows into the final file
LINE_BREAK = "the file name contains a line break, which the one-name-per-line .paths.txt cannot hold"


@dataclass(frozen=True)
class EmbedResult:
    out: Path  # the (rows, dim) float32 .npy
    paths_file: Path  # row i's image, relative to `folder`
    folder: Path
    rows: int
    dim: int
    layer: str
    normalize: bool
    checkpoint: Path | None  # None for a random-init encoder
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason) of files that could not be used
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "paths_file": str(self.paths_file),
            "folder": str(self.folder),
            "rows": self.rows,
            "dim": self.dim,
            "layer": self.layer,
            "normalize": self.normalize,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "random_init": self.checkpoint is None,
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "seconds": round(self.seconds, 3),
        }


def paths_file_for(out: Path) -> Path:
    """The sidecar listing row i's image: vecs.npy -> vecs.paths.txt."""
    return out.with_suffix(".paths.txt")


def read_paths(paths_file: Path) -> list[str]:
    """The sidecar's relative paths, non-UTF-8 names restored exactly as `run` wrote them (surrogateescape)."""
    return paths_file.read_text(encoding="utf-8", errors="surrogateescape").split("\n")[:-1]


def run(
    encoder: Encoder,
    folder: Path,
    *,
    out: Path,
    layer: str = "encoder",
    normalize: bool = False,
    batch_size: int = 256,
    workers: int = 0,
    rt: Runtime,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> EmbedResult:
    """Embed every image under `folder` (sorted, recursive) into `out` (.npy) and its .paths.txt sidecar."""
    started = time.perf_counter()
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    paths_file = paths_file_for(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out} must end with .npy (the embeddings are a NumPy array file)")
    for existing in (out, paths_file):
        if existing.exists() and not overwrite:
            raise ConfigError(f"{existing} already exists; pass --overwrite to replace it, or choose another --out")
    dim = layer_dim(encoder, layer)  # ConfigError for a layer this checkpoint lacks, before any work
    found = find_images(folder)
    # pathlib decodes names as os.fsdecode does (surrogateescape), so undecodable bytes survive as surrogates.
    names = [os.fsdecode(p.relative_to(folder).as_posix()) for p in found]
    skipped = [(name, LINE_BREAK) for name in names if "\n" in name or "\r" in name]
    listed = [i for i, name in enumerate(names) if "\n" not in name and "\r" not in name]
    paths, names = [found[i] for i in listed], [names[i] for i in listed]

    scratch = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        kept, unreadable = _write_rows(
            scratch, encoder, paths, dim=dim, layer=layer, normalize=normalize, batch_size=batch_size,
            workers=workers, rt=rt, progress=progress or NoProgress(),
        )
        skipped += [(names[i], reason) for i, reason in unreadable]
        if not kept:
            first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise DataError(f"none of the {len(found)} images under {folder} could be decoded{first}; check the files")
        if len(kept) == len(paths):
            atomic_write(out, lambda tmp: os.replace(scratch, tmp))
        else:
            atomic_write(out, lambda tmp: _copy_rows(scratch, tmp, rows=len(kept)))
    finally:
        scratch.unlink(missing_ok=True)
    # One name per line; non-UTF-8 bytes round-trip through surrogateescape (see read_paths).
    text = "".join(f"{names[i]}\n" for i in kept)
    atomic_write(paths_file, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape", newline="\n"))

    for name, reason in skipped:
        log.warning("skipped %s: %s", name, reason)
    log.info("embedded %d images (%s, %d-d%s) into %s", len(kept), layer, dim, ", L2-normalised" if normalize else "", out)
    return EmbedResult(
        out=out, paths_file=paths_file, folder=folder, rows=len(kept), dim=dim, layer=layer, normalize=normalize,
        checkpoint=encoder.source, skipped=tuple(skipped), seconds=time.perf_counter() - started,
    )


def _write_rows(
    scratch: Path, encoder: Encoder, paths: Sequence[Path], *, dim: int, layer: str, normalize: bool,
    batch_size: int, workers: int, rt: Runtime, progress: Progress,
) -> tuple[list[int], list[tuple[int, str]]]:
    """Write the decodable images' rows, in order, to the top of a (len(paths), dim) scratch .npy.

    Returns the indices of the rows written and (index, reason) of the images that could not be decoded.
    """
    batches = loader(_Decoded(paths, transform_for(encoder)), batch_size=batch_size, workers=workers, rt=rt,
                     collate_fn=_collate)
    model = prepare(encoder, rt)
    rows = open_memmap(scratch, mode="w+", dtype=np.float32, shape=(len(paths), dim))  # (N, D); unused tail if skips
    kept: list[int] = []
    unreadable: list[tuple[int, str]] = []
    started = time.perf_counter()
    progress.start(total_steps=len(batches), completed=0, description="embed")
    try:
        for step, (indices, x, failed) in enumerate(batches, start=1):
            unreadable += failed
            if x is not None:
                chunk = encode(model, x, layer=layer, rt=rt, normalize=normalize)  # (B, D)
                rows[len(kept) : len(kept) + len(indices)] = chunk.numpy()
                kept += indices
            rate = (len(kept) + len(unreadable)) / max(time.perf_counter() - started, 1e-9)
            progress.update(StepStats(step=step, epoch=0, total_steps=len(batches), loss=None, lr=0.0, images_per_s=rate))
        rows.flush()
    finally:
        progress.stop()
        del rows  # closes the memory map before the file is renamed or copied
    return kept, unreadable


def _copy_rows(src: Path, dst: Path, *, rows: int) -> None:
    """The first `rows` rows of the .npy `src` as the .npy `dst`, a block at a time (bounded memory)."""
    source = np.load(src, mmap_mode="r")
    target = open_memmap(dst, mode="w+", dtype=np.float32, shape=(rows, source.shape[1]))
    for start in range(0, rows, COPY_ROWS):
        stop = min(start + COPY_ROWS, rows)
        target[start:stop] = source[start:stop]
    target.flush()
    del source, target


class _Decoded(Dataset):
    """Item i: (i, transformed image, None), or (i, None, reason) when the file cannot be decoded."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            image = decode_image(self.paths[index])
        # Whatever PIL raises for a broken file (UnidentifiedImageError, OSError, ValueError, SyntaxError,
        # DecompressionBombError, ...) means this one file is unusable, not that the run should stop.
        except Exception as exc:  # noqa: BLE001
            return index, None, _reason(exc)
        return index, self.transform(image), None


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    """(indices of decoded images, their stacked tensors (B, 3, S, S) or None, [(index, reason)] of the rest)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    x = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], x, failed


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
