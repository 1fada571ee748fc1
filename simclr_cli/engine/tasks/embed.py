"""`simclr embed`: one feature row per image of a folder, as an N x D float32 .npy plus a sidecar of paths.

Rows are written to a memory-mapped .npy as they are computed, so a folder larger than RAM works.
Undecodable files follow the shared bad-image policy (badfiles.BadFiles: skip and list them in VECS.bad_files.jsonl,
or stop at the first; stop when most are bad). They are only discovered while reading, so the rows go to a
scratch file sized for every image found, and when some were skipped the decodable rows are copied into
a file of the right size (one extra sequential pass, only then). A cheap pre-scan (PIL open + verify)
was rejected: it opens every file twice and still misses files that verify but fail to decode. The .npy and
its sidecar appear only when every row is in place (atomic renames), so a stopped run leaves neither.

Under a process group (distributed.init) each rank decodes and encodes one contiguous, batch-aligned shard into
the same scratch file, which rank 0 then finalises exactly as one process does: the .npy is identical byte for
byte. The folder and `out` must be on storage every rank sees (one machine, or a shared filesystem such as
NFS or Lustre with close-to-open consistency).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from simclr_cli.engine import defaults, distributed, index, plots, rundir
from simclr_cli.engine.configs import EmbedConfig
from simclr_cli.engine.badfiles import DEFAULT_MAX_BAD_FRACTION, MIN_SEEN, BadFiles, report_for
from simclr_cli.engine.files import atomic_write, check_output_file
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS, FolderScan, ImageFiles, decoded_at_least, read_file_list, scan_folder
from simclr_cli.engine.shards import ShardImages, is_shard_source, open_shards
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import BadImage, ConfigError, DataError, Stopped
from simclr_cli.engine.index import LINE_BREAK, relative_name
from simclr_cli.engine.features import (Encoder, decode_side_for, encode, layer_dim, loader, local_rows, open_encoder,
                                         prepare, transform_for)
from simclr_cli.engine.report import NoProgress, Progress, StepStats

log = logging.getLogger("simclr")

COPY_ROWS = 65536  # rows per block when copying the decodable rows into the final file


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
    skipped_folders: tuple[tuple[str, str], ...] = ()  # (relative path, reason) of folders the walk skipped
    bad_files: Path | None = None  # the bad-files report, when there was anything to list

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
            "skipped_folders": [{"path": path, "reason": reason} for path, reason in self.skipped_folders],
            "bad_files": None if self.bad_files is None else str(self.bad_files),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Embedded:
    """What `simclr embed` shows: the rows written, and the 2-D map when one was drawn."""

    result: EmbedResult
    map: Path | None


def run(cfg: EmbedConfig, *, folder: Path, out: Path, checkpoint: Path | None, overwrite: bool = False,
        file_list: Path | None = None, progress: Progress | None = None) -> Embedded | None:
    """Embed every image under `folder` with the encoder in `checkpoint` (default runs/latest/encoder.safetensors) into
    the index `out` (VECS.npy, VECS.paths.txt, VECS.json); with `cfg.plot` also a map, VECS.png. Returns what to show
    on the main process, None on the others."""
    cfg.validate()
    with distributed.context(device=cfg.device) as world:
        path = rundir.resolve_checkpoint(checkpoint)
        log.info("checkpoint: %s", path)
        encoder = open_encoder(path)
        rt = runtime(device=cfg.device, precision=cfg.precision)
        result = embed_folder(
            encoder, folder, out=out, layer=cfg.layer, normalize=cfg.normalize, batch_size=cfg.batch_size,
            workers=defaults.resolve_workers(cfg.workers, rt.device), rt=rt, progress=progress if world.is_main else None,
            overwrite=overwrite, on_bad_image=cfg.on_bad_image, max_bad_fraction=cfg.max_bad_fraction,
            max_image_pixels=cfg.max_image_pixels, file_list=file_list,
        )
        if not world.is_main:
            return None
        # the encoder's hash: retrieval refuses queries embedded by other weights
        index.write_metadata(result.out, {**result.to_dict(), "encoder_spec": encoder.spec,
                                          "checkpoint_sha256": encoder.digest})
        return Embedded(result=result, map=_plot(result, method=cfg.plot_method) if cfg.plot else None)


def _plot(result: EmbedResult, *, method: str) -> Path:
    """A 2-D map of the rows with image thumbnails; images in subfolders are coloured by their top-level folder
    (a class-per-folder tree shows its classes)."""
    vectors = np.load(result.out, mmap_mode="r", allow_pickle=False)  # (N, D)
    names = index.read_paths(result.paths_file)
    labels = [name.split("/", 1)[0] for name in names] if all("/" in name for name in names) else None
    return plots.plot_embedding(vectors, out=result.out.with_suffix(".png"), labels=labels,
                                thumbnails=None if is_shard_source(result.folder) else [result.folder / name for name in names],
                                method=method)


def embed_folder(
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
    on_bad_image: str = "skip",
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    file_list: Path | None = None,
) -> EmbedResult:
    """Embed every image under `folder` (sorted, recursive), or those `file_list` names (images.read_file_list),
    into `out` (.npy) and its .paths.txt sidecar.

    Files that cannot be used follow the bad-image policy (see badfiles.BadFiles; `max_image_pixels` 0 = no limit)
    and are listed in <out>.bad_files.jsonl. Under a process group every rank returns the same result (but its own
    `seconds`); rank 0 writes the files.
    """
    started = time.perf_counter()
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    paths_file, report = index.paths_file_for(out), report_for(out)
    world = distributed.current_world()
    # A bad policy value is the same ConfigError on every rank, before any collective; only rank 0 writes the report.
    bad = BadFiles(on_bad_image=on_bad_image, max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels,
                   report=report if world.is_main else None)
    # Every rank checks the same things; if one fails alone (storage differs), the others stop too.
    source, dim = distributed.on_every_rank(
        lambda: _check(encoder, folder, out, paths_file, layer=layer, overwrite=overwrite, file_list=file_list,
                       max_pixels=bad.max_pixels),
        device=rt.device,
    )
    if isinstance(source, ShardImages):  # rows keyed by sample key; bad samples named shard.tar:key
        found, names, skipped_folders = source.paths, source.keys, []
    else:
        found, skipped_folders = source.images, source.skipped_folders
        # pathlib decodes names as os.fsdecode does (surrogateescape), so undecodable bytes survive as surrogates.
        names = [relative_name(p, folder) for p in found]
    line_broken = [i for i, name in enumerate(names) if "\n" in name or "\r" in name]
    skipped = [(names[i], LINE_BREAK) for i in line_broken]
    listed = [i for i, name in enumerate(names) if "\n" not in name and "\r" not in name]
    paths, names = [found[i] for i in listed], [names[i] for i in listed]
    # shard keys hold no line break (shards.index_shards), so a ShardImages is read whole
    images = source if isinstance(source, ShardImages) else ImageFiles(paths, max_pixels=bad.max_pixels)
    rows = local_rows(len(paths), batch_size=batch_size)  # this rank's shard of `paths`

    scratch = _scratch_path(out, world, device=rt.device)
    restore_sigterm = _stop_on_sigterm()
    try:
        # on_main's closing all-reduce is the barrier: once it returns, every rank can open the scratch file.
        distributed.on_main(world, lambda: _begin(scratch, report, rows=len(paths), dim=dim), device=rt.device)
        for path, reason in skipped_folders:
            bad.add_folder(path, reason)
        for i in line_broken:  # the same on every rank, so with --on-bad-image error every rank stops here
            bad.add(found[i], LINE_BREAK)
        mine = distributed.on_every_rank(
            lambda: _write_rows(
                scratch, encoder, images, rows=rows, dim=dim, layer=layer, normalize=normalize, batch_size=batch_size,
                workers=workers, rt=rt, progress=(progress or NoProgress()) if world.is_main else NoProgress(),
                world=world, bad=bad, seen_before=len(line_broken), total=len(found),
            ),
            device=rt.device,
        )
        unreadable = distributed.on_every_rank(lambda: _unreadable_of_all_ranks(scratch, mine, world), device=rt.device)
        # Every rank now knows every bad file: each judges the whole folder, rank 0 also lists the other ranks' finds.
        distributed.on_every_rank(lambda: _judge(bad, [(paths[i], reason) for i, reason in unreadable], total=len(found)),
                                  device=rt.device)
        failed = {i for i, _ in unreadable}
        kept = [i for i in range(len(paths)) if i not in failed]
        skipped += [(names[i], reason) for i, reason in unreadable]
        if not kept:
            first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise DataError(f"none of the {len(found)} images under {folder} could be decoded{first}; check the files")
        distributed.on_main(world, lambda: _finish(scratch, out, paths_file, kept=kept, names=names, overwrite=overwrite),
                            device=rt.device)
    except _Terminated as exc:
        raise Stopped(
            f"embed stopped by {signal.Signals(exc.signum).name}: the unfinished {scratch.name} was removed and nothing "
            f"was written to {out}; run it again",
            signal_number=exc.signum,
        ) from None
    finally:
        if world.is_main:  # every rank is past reading the scratch files when rank 0 gets here (or has failed)
            scratch.unlink(missing_ok=True)
            for rank in range(world.world_size):
                _unreadable_file(scratch, rank).unlink(missing_ok=True)
        restore_sigterm()

    if bad.files or bad.folders:
        log.info(bad.summary())
    log.info("embedded %d images (%s, %d-d%s) into %s", len(kept), layer, dim, ", L2-normalised" if normalize else "", out)
    result = EmbedResult(
        out=out, paths_file=paths_file, folder=folder, rows=len(kept), dim=dim, layer=layer, normalize=normalize,
        checkpoint=encoder.source, skipped=tuple(skipped), seconds=time.perf_counter() - started,
        skipped_folders=tuple((relative_name(Path(p), folder), reason) for p, reason in bad.folders),
        bad_files=report if bad.files or bad.folders else None,
    )
    return result


def _check(encoder: Encoder, folder: Path, out: Path, paths_file: Path, *, layer: str, overwrite: bool,
           file_list: Path | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[FolderScan | ShardImages, int]:
    """(what the walk found, or the samples of tar shards; the feature width), or the ConfigError / DataError that
    stops the run before any work."""
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out} must end with .npy (the embeddings are a NumPy array file)")
    check_output_file(out, overwrite=overwrite, sidecars=(paths_file,))
    dim = layer_dim(encoder, layer)  # ConfigError for a layer this checkpoint lacks
    if file_list is not None:
        return FolderScan(read_file_list(file_list, base=folder), []), dim
    if is_shard_source(folder):
        return open_shards(folder, max_pixels=max_pixels), dim
    return scan_folder(folder), dim


def _judge(bad: BadFiles, unreadable: list[tuple[Path, str]], *, total: int) -> None:
    """Every bad file of every rank into `bad` (each is listed once), then the fraction over the whole folder."""
    for path, reason in unreadable:
        bad.add(path, reason)
    bad.check(seen=total, total=total)


def _scratch_path(out: Path, world: distributed.World, *, device: torch.device) -> Path:
    """A fresh scratch file name beside `out`, the same on every rank (rank 0 draws it)."""
    token = torch.tensor(secrets.randbits(62) if world.is_main else 0, dtype=torch.int64, device=device)
    token = int(distributed.all_reduce_max(token).item())
    return out.parent / f".{out.name}.{token:016x}.partial.npy"


def _begin(scratch: Path, report: Path, *, rows: int, dim: int) -> None:
    """Rank 0, before any row: a (rows, dim) float32 .npy of zeros (sparse where the filesystem allows) for the ranks
    to fill; a bad-files report left by an earlier run to this --out goes, as this run lists its own."""
    report.unlink(missing_ok=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    created = open_memmap(scratch, mode="w+", dtype=np.float32, shape=(rows, dim))  # (N, D)
    created.flush()
    del created


def _unreadable_file(scratch: Path, rank: int) -> Path:
    return scratch.with_name(f"{scratch.name}.rank{rank}.json")


def _unreadable_of_all_ranks(scratch: Path, mine: list[tuple[int, str]], world: distributed.World) -> list[tuple[int, str]]:
    """Every rank's (index, reason) list in index order, read from the JSON file each rank wrote beside the scratch
    file (no pickle; ensure_ascii keeps surrogate-escaped names intact)."""
    if world.world_size == 1:
        return mine
    everyone: list[tuple[int, str]] = []
    for rank in range(world.world_size):  # contiguous shards in rank order: index order
        entries = json.loads(_unreadable_file(scratch, rank).read_text(encoding="ascii"))
        everyone += [(int(index), str(reason)) for index, reason in entries]
    return everyone


def _finish(scratch: Path, out: Path, paths_file: Path, *, kept: list[int], names: list[str], overwrite: bool) -> None:
    """Rank 0: the decodable rows as `out` and their names as the sidecar, each written atomically; without
    `overwrite` each is created only if it does not exist, so of two runs to one --out the second is refused."""
    try:
        if len(kept) == len(names):
            atomic_write(out, lambda tmp: os.replace(scratch, tmp), replace=overwrite)
        else:
            atomic_write(out, lambda tmp: _copy_rows(scratch, tmp, kept=kept), replace=overwrite)
        index.write_paths(paths_file, [names[i] for i in kept], replace=overwrite)
    except FileExistsError as exc:
        raise ConfigError(
            f"{exc.filename2} was created by another run while this one was embedding; it is kept as it is. "
            "Pass --overwrite to replace it, or choose another --out"
        ) from None


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that no `except Exception` (the image decoder's) takes it for a bad file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_sigterm() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM raises _Terminated, so the `finally` that removes the unfinished
    scratch file runs (the signal's default would end the process at once and leave a full-size .partial.npy)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # handlers can only be set from the main thread

    def stop(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _write_rows(
    scratch: Path, encoder: Encoder, images: ImageFiles | ShardImages, *, rows: range, dim: int, layer: str, normalize: bool,
    batch_size: int, workers: int, rt: Runtime, progress: Progress, world: distributed.World, bad: BadFiles,
    seen_before: int, total: int,
) -> list[tuple[int, str]]:
    """Write row i of the (len(images), dim) scratch .npy for each decodable image i in `rows`; undecodable images
    leave their row zero and go to `bad` as they are found (which may stop the run: policy "error", or too many
    of the `seen_before` + this rank's images so far out of `total` are bad). Returns (index, reason) of those,
    also written as JSON for rank 0 under a process group.

    Plain writes at exact byte offsets, not a shared memory map: a map writes back whole pages, and on a network
    filesystem the page two ranks share would lose one rank's rows.
    """
    decoded = _Decoded(decoded_at_least(images, decode_side_for(encoder)), transform_for(encoder))
    batches = loader(Subset(decoded, rows), batch_size=batch_size, workers=workers, rt=rt, collate_fn=_collate)
    model = prepare(encoder, rt)
    offset = np.load(scratch, mmap_mode="r").offset  # the .npy header's length
    unreadable: list[tuple[int, str]] = []
    done = 0
    started = time.perf_counter()
    progress.start(total_steps=len(batches), completed=0, description="embed")
    try:
        with open(scratch, "r+b") as handle:
            for step, (indices, x, failed) in enumerate(batches, start=1):
                unreadable += failed
                for i, reason in failed:
                    bad.add(images.paths[i], reason)
                first = min(indices + [i for i, _ in failed])  # a batch is a contiguous run of rows
                block = np.zeros((len(indices) + len(failed), dim), dtype=np.float32)  # (B, D)
                if x is not None:
                    block[np.asarray(indices) - first] = encode(model, x, layer=layer, rt=rt, normalize=normalize).numpy()
                handle.seek(offset + first * dim * block.itemsize)
                handle.write(block.tobytes())
                done += len(block)
                # A rank judges its own share early only once it has seen MIN_SEEN images; a small folder is judged
                # at the end, by every rank alike (_judge), so each stops with the one-process message.
                bad.check(seen=seen_before + done, total=total if world.world_size == 1 else max(total, MIN_SEEN))
                # The shards are balanced, so rank 0's rate times the ranks is the whole job's.
                rate = done * world.world_size / max(time.perf_counter() - started, 1e-9)
                progress.update(StepStats(step=step, epoch=None, total_steps=len(batches), loss=None, lr=0.0, images_per_s=rate))
    finally:
        progress.stop()
    if world.world_size > 1:
        _unreadable_file(scratch, world.rank).write_text(json.dumps(unreadable), encoding="ascii")
    return unreadable


def _copy_rows(src: Path, dst: Path, *, kept: list[int]) -> None:
    """Rows `kept` (ascending) of the .npy `src` as the .npy `dst`, a block at a time (bounded memory)."""
    source = np.load(src, mmap_mode="r")
    target = open_memmap(dst, mode="w+", dtype=np.float32, shape=(len(kept), source.shape[1]))
    index = np.asarray(kept, dtype=np.int64)
    for start in range(0, len(kept), COPY_ROWS):
        target[start : start + COPY_ROWS] = source[index[start : start + COPY_ROWS]]
    target.flush()
    del source, target


class _Decoded(Dataset):
    """Item i: (i, transformed image, None), or (i, None, reason) when the file cannot be decoded. `images` decode
    JPEGs at the smallest scale still covering the transform's resize (images.decoded_at_least)."""

    def __init__(self, images: Dataset, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            image = self.images[index]
        except BadImage as exc:  # this one file is unusable; the main process applies the policy
            return index, None, exc.reason
        return index, self.transform(image), None


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    """(indices of decoded images, their stacked tensors (B, 3, S, S) or None, [(index, reason)] of the rest)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    x = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], x, failed
