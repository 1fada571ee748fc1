"""`simclr embed`: one feature row per image of a folder, as an N x D float32 .npy plus a sidecar of paths.

Rows are written to a memory-mapped .npy as they are computed, so a folder larger than RAM works.
Undecodable files follow the shared bad-image policy (badfiles.BadFiles: skip and list them in VECS.bad_files.jsonl,
or stop at the first; stop when most are bad). They are only discovered while reading, so the rows go to an
unfinished .npy sized for every image found (partial.PartialRows), and when some were skipped the decodable rows
are copied into a file of the right size (one extra sequential pass, only then). A cheap pre-scan (PIL open +
verify) was rejected: it opens every file twice and still misses files that verify but fail to decode. The .npy
and its sidecar appear only when every row is in place (atomic renames).

A run stopped by a signal, or killed, leaves the unfinished .npy and its progress records beside `out`;
`--resume` reads the saved image list and embeds only the rows not recorded as written, in the same batches,
so the result equals an uninterrupted run's (bit for bit with the same batch size and process count on the CPU).
A run that fails on its input (the bad-image policy) removes them: it starts again once the input is fixed.

Under a process group (distributed.init) each rank decodes and encodes one batch-aligned share of the rows still to
do into the same unfinished file, which rank 0 then finalises exactly as one process does: the .npy is identical
byte for byte. The folder and `out` must be on storage every rank sees (one machine, or a shared filesystem such
as NFS or Lustre with close-to-open consistency).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
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

from simclr_cli.engine import badfiles, defaults, distributed, index, plots, rundir, shards
from simclr_cli.engine.configs import EmbedConfig
from simclr_cli.engine.badfiles import DEFAULT_MAX_BAD_FRACTION, MIN_SEEN, BadFiles, report_for
from simclr_cli.engine.files import atomic_write, check_output_file
from simclr_cli.engine.images import (DEFAULT_MAX_PIXELS, FolderScan, ImageFiles, decoded_at_least, read_file_list, scan_folder,
                                      write_file_list)
from simclr_cli.engine.partial import PartialRows, Runs, merge_runs, missing, runs_of
from simclr_cli.engine.shards import ShardImages, is_shard_source, open_shards
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import BadImage, ConfigError, DataError, Stopped
from simclr_cli.engine.index import LINE_BREAK, relative_name
from simclr_cli.engine.features import (Encoder, decode_side_for, encode, layer_dim, loader, local_rows, open_encoder,
                                         prepare, transform_for)
from simclr_cli.engine.report import NoProgress, Progress, StepStats

log = logging.getLogger("simclr")

COPY_ROWS = 65536  # rows per block when copying the decodable rows into the final file
CHUNK_SECONDS = 60.0  # progress is also recorded at least this often, however slowly the rows come


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
        file_list: Path | None = None, resume: bool = False, progress: Progress | None = None) -> Embedded | None:
    """Embed every image under `folder` with the encoder in `checkpoint` (default runs/latest/encoder.safetensors) into
    the index `out` (VECS.npy, VECS.paths.txt, VECS.json); with `cfg.plot` also a map, VECS.png. With `resume`,
    continue the unfinished embed to `out`. Returns what to show on the main process, None on the others."""
    cfg.validate()
    with distributed.context(device=cfg.device) as world, contextlib.ExitStack() as held:
        rt = runtime(device=cfg.device, precision=cfg.precision)
        partial = PartialRows(Path(out).expanduser())
        distributed.on_every_rank(lambda: held.enter_context(partial.locked()) if world.is_main else None, device=rt.device)
        path = rundir.resolve_checkpoint(checkpoint)
        log.info("checkpoint: %s", path)
        encoder = open_encoder(path)
        result = embed_folder(
            encoder, folder, out=out, layer=cfg.layer, normalize=cfg.normalize, batch_size=cfg.batch_size,
            workers=defaults.resolve_workers(cfg.workers, rt.device), rt=rt, progress=progress if world.is_main else None,
            overwrite=overwrite, on_bad_image=cfg.on_bad_image, max_bad_fraction=cfg.max_bad_fraction,
            max_image_pixels=cfg.max_image_pixels, file_list=file_list, resume=resume, chunk_rows=cfg.chunk_rows,
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
    resume: bool = False,
    chunk_rows: int = 4096,
) -> EmbedResult:
    """Embed every image under `folder` (sorted, recursive), or those `file_list` names (images.read_file_list),
    into `out` (.npy) and its .paths.txt sidecar; with `resume`, only the rows the unfinished embed to `out` lacks.
    Progress is recorded every `chunk_rows` rows (and every CHUNK_SECONDS).

    Files that cannot be used follow the bad-image policy (see badfiles.BadFiles; `max_image_pixels` 0 = no limit)
    and are listed in <out>.bad_files.jsonl. Under a process group every rank returns the same result (but its own
    `seconds`); rank 0 writes the files.
    """
    started = time.perf_counter()
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    paths_file, report, partial = index.paths_file_for(out), report_for(out), PartialRows(out)
    world = distributed.current_world()
    # A bad policy value is the same ConfigError on every rank, before any collective; only rank 0 writes the report.
    bad = BadFiles(on_bad_image=on_bad_image, max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels,
                   report=report if world.is_main else None)
    settings = {"source": os.fsdecode(folder.absolute()), "checkpoint_sha256": encoder.digest, "layer": layer,
                "normalize": normalize, "replace": overwrite}
    # Every rank checks the same things; if one fails alone (storage differs), the others stop too.
    source, dim, settings = distributed.on_every_rank(
        lambda: _check(encoder, folder, out, paths_file, partial, layer=layer, overwrite=overwrite, file_list=file_list,
                       max_pixels=bad.max_pixels, resume=resume, settings=settings),
        device=rt.device,
    )
    if isinstance(source, ShardImages):  # rows keyed by sample key; bad samples named shard.tar:key
        found, names, skipped_folders = source.paths, source.keys, []
    else:
        found = source.images
        # the walk's finds, kept in the settings for a resumed run (which reads the saved list, not the folder)
        skipped_folders = [tuple(pair) for pair in settings.setdefault(
            "skipped_folders", [(os.fspath(path), reason) for path, reason in source.skipped_folders])]
        # pathlib decodes names as os.fsdecode does (surrogateescape), so undecodable bytes survive as surrogates.
        names = [relative_name(p, folder) for p in found]
    # names with a line break were left out of the saved list by the run a resumed one continues: its settings keep them
    line_broken = [(os.fspath(found[i]), name) for i, name in enumerate(names) if "\n" in name or "\r" in name]
    line_broken = [tuple(pair) for pair in settings.setdefault("line_broken", line_broken)]
    listed = [i for i, name in enumerate(names) if "\n" not in name and "\r" not in name]
    paths, names = [found[i] for i in listed], [names[i] for i in listed]
    skipped = [(name, LINE_BREAK) for _, name in line_broken]
    total = len(paths) + len(line_broken)
    # shard keys hold no line break (shards.index_shards), so a ShardImages is read whole
    images = source if isinstance(source, ShardImages) else ImageFiles(paths, max_pixels=bad.max_pixels)

    restore_sigterm = _stop_on_sigterm()
    keep = False  # the unfinished rows stay for --resume when the run is stopped, not when its input fails
    try:
        # on_main's closing all-reduce is the barrier: once it returns, every rank can open the unfinished file.
        distributed.on_main(world, lambda: _begin(partial, report, images, folder=folder, resume=resume, rows=len(paths),
                                                  dim=dim, settings=settings), device=rt.device)
        done, earlier = distributed.on_every_rank(partial.progress, device=rt.device)
        todo = missing(len(paths), done)
        if resume:
            log.info("resuming the embed to %s: %d of %d rows were written, %d to go", out, len(paths) - len(todo),
                     len(paths), len(todo))
        for path, reason in skipped_folders:
            bad.add_folder(path, reason)
        for path, _ in line_broken:  # the same on every rank, so with --on-bad-image error every rank stops here
            if resume:
                bad.add_known(path, LINE_BREAK)
            else:
                bad.add(path, LINE_BREAK)
        for i, reason in earlier:
            bad.add_known(paths[i], reason)
        distributed.on_every_rank(
            lambda: _write_rows(
                partial, encoder, images, rows=todo[_as_slice(local_rows(len(todo), batch_size=batch_size))], dim=dim, layer=layer,
                normalize=normalize, batch_size=batch_size, workers=workers, rt=rt,
                progress=(progress or NoProgress()) if world.is_main else NoProgress(), world=world, bad=bad,
                seen_before=total - len(todo), total=total, chunk_rows=chunk_rows,
                done=done if world.is_main else [], unreadable=earlier if world.is_main else [],
            ),
            device=rt.device,
        )
        _, unreadable = distributed.on_every_rank(partial.progress, device=rt.device)
        # Every rank now knows every bad file: each judges the whole folder, rank 0 also lists the other ranks' finds.
        distributed.on_every_rank(lambda: _judge(bad, [(paths[i], reason) for i, reason in unreadable], total=total),
                                  device=rt.device)
        failed = {i for i, _ in unreadable}
        kept = [i for i in range(len(paths)) if i not in failed]
        skipped += [(names[i], reason) for i, reason in unreadable]
        if not kept:
            first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise DataError(f"none of the {total} images under {folder} could be decoded{first}; check the files")
        distributed.on_main(world, lambda: _finish(partial, out, paths_file, report, kept=kept, names=names,
                                                   overwrite=overwrite or settings["replace"], resumed=resume),
                            device=rt.device)
    except _Terminated as exc:
        name = signal.Signals(exc.signum).name
        keep = partial.exists()  # False when the signal came before the unfinished run was whole (its settings)
        if not keep:
            raise Stopped(f"embed stopped by {name} before it had rows to keep; run the same command again",
                          signal_number=exc.signum) from None
        raise Stopped(
            f"embed stopped by {name}: the rows written so far are kept in "
            f"{partial.rows_file.name}; run the same command with --resume to continue",
            signal_number=exc.signum,
        ) from None
    except KeyboardInterrupt:
        keep = True
        raise
    finally:
        if world.is_main and not keep:  # every rank is past reading the unfinished files when rank 0 gets here
            partial.remove()
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


def _check(encoder: Encoder, folder: Path, out: Path, paths_file: Path, partial: PartialRows, *, layer: str,
           overwrite: bool, file_list: Path | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS, resume: bool = False,
           settings: dict[str, Any]) -> tuple[FolderScan | ShardImages, int, dict[str, Any]]:
    """(what the walk found, or the samples of tar shards; the feature width; the run's settings, a resumed run's
    own), or the ConfigError / DataError that stops the run before any work."""
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out} must end with .npy (the embeddings are a NumPy array file)")
    dim = layer_dim(encoder, layer)  # ConfigError for a layer this checkpoint lacks
    if resume:
        return _resumed_source(partial, folder, out, paths_file, settings=settings, max_pixels=max_pixels, dim=dim,
                               overwrite=overwrite)
    if partial.exists() and not overwrite:
        raise ConfigError(f"an unfinished embed to {out} is there ({partial.rows_file.name}); pass --resume to continue "
                          "it, or --overwrite to start again")
    check_output_file(out, overwrite=overwrite, sidecars=(paths_file,))
    if file_list is not None:
        return FolderScan(read_file_list(file_list, base=folder), []), dim, settings
    if is_shard_source(folder):
        return open_shards(folder, max_pixels=max_pixels), dim, settings
    return scan_folder(folder), dim, settings


def _resumed_source(partial: PartialRows, folder: Path, out: Path, paths_file: Path, *, settings: dict[str, Any],
                    max_pixels: int | None, dim: int, overwrite: bool) -> tuple[FolderScan | ShardImages, int, dict[str, Any]]:
    """The images of the unfinished embed to `out`, from its saved list, once its settings match this run's."""
    if not partial.exists():
        done = " is complete, so" if out.is_file() else ""
        raise ConfigError(f"{out}{done} there is no unfinished embed to resume; run without --resume"
                          f"{' and with --overwrite to embed again' if done else ''}")
    saved = partial.settings()
    for key, what in (("source", "the images of"), ("checkpoint_sha256", "the checkpoint of"), ("layer", "the --layer of"),
                      ("normalize", "--normalize in")):
        if saved.get(key) != settings[key]:
            raise ConfigError(f"{what} this run differ from those of the unfinished embed to {out} ({saved.get(key)!r}); "
                              "resume with the same FOLDER, checkpoint and options, or pass --overwrite without --resume "
                              "to start again")
    if saved["dim"] != dim:
        raise ConfigError(f"the unfinished embed to {out} has {saved['dim']}-d rows, this encoder gives {dim}")
    check_output_file(out, overwrite=overwrite or bool(saved.get("replace")), sidecars=(paths_file,))
    shard_index = partial.listing_file("shards.tsv")
    if shard_index.is_file():
        source: FolderScan | ShardImages = open_shards(folder, max_pixels=max_pixels, saved_index=shard_index)
    else:
        source = FolderScan(read_file_list(partial.listing_file("files.txt"), base=folder, check=False), [])
    return source, dim, saved


def _as_slice(rows: range) -> slice:
    return slice(rows.start, rows.stop)


def _judge(bad: BadFiles, unreadable: list[tuple[Path, str]], *, total: int) -> None:
    """Every bad file of every rank into `bad` (each is listed once), then the fraction over the whole folder."""
    for path, reason in unreadable:
        bad.add(path, reason)
    bad.check(seen=total, total=total)


def _begin(partial: PartialRows, report: Path, images: ImageFiles | ShardImages, *, folder: Path, resume: bool, rows: int,
           dim: int, settings: dict[str, Any]) -> None:
    """Rank 0, before any row. Afresh: the unfinished .npy of zeros, its settings and the images' order (a bad-files
    report left by an earlier run to this --out goes, as this run lists its own). Resumed: every earlier process's
    progress gathered as rank 0's."""
    if resume:
        partial.gather_progress()
        return
    report.unlink(missing_ok=True)
    if isinstance(images, ShardImages):
        listing = functools.partial(shards.write_index, partial.listing_file("shards.tsv"), images)
    else:
        listing = functools.partial(write_file_list, partial.listing_file("files.txt"), images.paths, base=folder)
    partial.create(rows=rows, dim=dim, settings=settings, write_listing=listing)


def _finish(partial: PartialRows, out: Path, paths_file: Path, report: Path, *, kept: list[int], names: list[str],
            overwrite: bool, resumed: bool) -> None:
    """Rank 0: the decodable rows as `out` and their names as the sidecar, each written atomically; without
    `overwrite` each is created only if it does not exist, so of two runs to one --out the second is refused."""
    if resumed:  # a bad file found again after the last progress record is listed once
        badfiles.merge(report, [])
    try:
        if len(kept) == len(names):
            atomic_write(out, lambda tmp: os.replace(partial.rows_file, tmp), replace=overwrite)
        else:
            atomic_write(out, lambda tmp: _copy_rows(partial.rows_file, tmp, kept=kept), replace=overwrite)
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
    partial: PartialRows, encoder: Encoder, images: ImageFiles | ShardImages, *, rows: np.ndarray, dim: int, layer: str,
    normalize: bool, batch_size: int, workers: int, rt: Runtime, progress: Progress, world: distributed.World,
    bad: BadFiles, seen_before: int, total: int, chunk_rows: int, done: Runs, unreadable: list[tuple[int, str]],
) -> None:
    """Write row i of the unfinished (len(images), dim) .npy for each decodable image i in `rows` (ascending);
    undecodable images leave their row zero and go to `bad` as they are found (which may stop the run: policy
    "error", or too many of the `seen_before` + this rank's images so far out of `total` are bad). After every
    `chunk_rows` rows, and at the end, this rank's progress record says which rows are written (`done` and
    `unreadable` included: what an earlier run did, on rank 0) and which images could not be decoded.

    Plain writes at exact byte offsets, not a shared memory map: a map writes back whole pages, and on a network
    filesystem the page two ranks share would lose one rank's rows.
    """
    decoded = _Decoded(decoded_at_least(images, decode_side_for(encoder)), transform_for(encoder))
    batches = loader(Subset(decoded, rows.tolist()), batch_size=batch_size, workers=workers, rt=rt, collate_fn=_collate)
    model = prepare(encoder, rt)
    offset = np.load(partial.rows_file, mmap_mode="r").offset  # the .npy header's length
    unreadable = list(unreadable)
    written, unrecorded = 0, 0
    started = recorded = time.perf_counter()
    progress.start(total_steps=len(batches), completed=0, description="embed")
    try:
        with open(partial.rows_file, "r+b") as handle:
            for step, (indices, x, failed) in enumerate(batches, start=1):
                unreadable += failed
                for i, reason in failed:
                    bad.add(images.paths[i], reason)
                batch = np.sort(np.asarray(indices + [i for i, _ in failed]))  # a resumed run's batch may span a gap
                block = np.zeros((len(batch), dim), dtype=np.float32)  # (B, D)
                if x is not None:
                    block[np.searchsorted(batch, indices)] = encode(model, x, layer=layer, rt=rt, normalize=normalize).numpy()
                at = 0
                for start, stop in runs_of(batch.tolist()):
                    handle.seek(offset + start * dim * block.itemsize)
                    handle.write(block[at : at + stop - start].tobytes())
                    at += stop - start
                done = merge_runs(done, runs_of(batch.tolist()))
                written += len(block)
                unrecorded += len(block)
                if unrecorded >= chunk_rows or time.perf_counter() - recorded >= CHUNK_SECONDS:
                    partial.record(world.rank, done=done, unreadable=unreadable, handle=handle)
                    unrecorded, recorded = 0, time.perf_counter()
                # A rank judges its own share early only once it has seen MIN_SEEN images; a small folder is judged
                # at the end, by every rank alike (_judge), so each stops with the one-process message.
                bad.check(seen=seen_before + written, total=total if world.world_size == 1 else max(total, MIN_SEEN))
                # The shares are balanced, so rank 0's rate times the ranks is the whole job's.
                rate = written * world.world_size / max(time.perf_counter() - started, 1e-9)
                progress.update(StepStats(step=step, epoch=None, total_steps=len(batches), loss=None, lr=0.0, images_per_s=rate))
            partial.record(world.rank, done=done, unreadable=unreadable, handle=handle)
    finally:
        progress.stop()


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
