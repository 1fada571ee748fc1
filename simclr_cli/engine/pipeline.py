"""The pretraining input pipeline: images decoded at most once per epoch into uint8 pixels, kept in memory
when they fit a budget, and delivered as padded uint8 batches for `views.BatchViews` to augment on the
training device.

Workers only decode (or copy cached pixels); every random choice is made later, on the device, from
(seed, epoch, index), so the batches a run sees do not depend on how many workers made them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from simclr_cli.engine import badfiles, decoders, distributed, memory, sharedcache
from simclr_cli.engine.device import MAX_WORKERS
from simclr_cli.engine.errors import BadImage, ConfigError, DataError, is_finite_number, is_whole_number
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS, decoded_at_least, printable_path

log = logging.getLogger("simclr")

SAMPLE_FOR_ESTIMATE = 64  # images decoded to estimate what the whole dataset takes in memory
DEFAULT_CACHE_FRACTION = 0.5  # of the memory available at start, for the one cache of this machine's processes
BYTES_PER_GB = 1024**3


@dataclass
class DataConfig:
    source: str | None = None  # a folder of images, a dataset name, or None for the embedded digits
    root: str | None = None  # where named datasets are stored
    download: bool = False
    workers: int | None = None  # DataLoader worker processes; None = chosen from the machine
    on_bad_image: str = "skip"  # skip: use the next decodable image and name the bad one; error: stop, naming it
    decode_side: int | None = None  # decoded images' short side is shrunk to at most this; None = 2x the view size
    cache_gb: float | None = None  # this machine's memory for decoded images kept between epochs; None = half the free memory, 0 = off
    decode_device: str = "auto"  # where the cache is filled: auto (the GPU when training on one), cpu, or cuda (JPEGs by nvJPEG)
    max_bad_fraction: float = badfiles.DEFAULT_MAX_BAD_FRACTION  # stop when more of the images drawn are undecodable
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit, read from the header; 0 = off (warned)
    file_list: str | None = None  # the images, one path a line (relative to the data folder, or absolute); None = search it
    subset: int | None = None  # train on this many of the images, drawn with train.seed (subsets.py); None = all
    unbalanced: float | None = None  # a log-unbalanced draw of the classes, ALPHA >= 1 (subsets.py); None = as they are

    def validate(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"data.workers {self.workers} must be >= 0; use 0 to load in the main process")
        if self.workers is not None and self.workers > MAX_WORKERS:
            raise ConfigError(f"data.workers {self.workers} is more than {MAX_WORKERS}; use about one per CPU core")
        if self.decode_side is not None and (isinstance(self.decode_side, bool) or not isinstance(self.decode_side, int)
                                             or self.decode_side < 8):
            raise ConfigError(f"data.decode_side {self.decode_side!r} must be a whole number of pixels >= 8, or unset for 2x the image size")
        if self.cache_gb is not None and (isinstance(self.cache_gb, bool) or not isinstance(self.cache_gb, (int, float))
                                          or not math.isfinite(self.cache_gb) or self.cache_gb < 0):
            raise ConfigError(f"data.cache_gb {self.cache_gb!r} must be a number of GB >= 0 (0 turns the cache off), or unset")
        if self.decode_device not in decoders.DECODE_DEVICES:
            raise ConfigError(f"data.decode_device {self.decode_device!r} is not supported; choose one of {', '.join(decoders.DECODE_DEVICES)}")
        badfiles.BadFiles.check_settings(max_bad_fraction=self.max_bad_fraction, max_image_pixels=self.max_image_pixels)
        if self.on_bad_image not in badfiles.POLICIES:
            raise ConfigError(f"data.on_bad_image {self.on_bad_image!r} is not supported; choose one of {', '.join(badfiles.POLICIES)}")
        if self.subset is not None and (not is_whole_number(self.subset) or self.subset < 1):
            raise ConfigError(f"data.subset (--subset) {self.subset!r} must be a whole number of images >= 1, or unset for all")
        if self.unbalanced is not None and not (is_finite_number(self.unbalanced) and self.unbalanced >= 1):
            raise ConfigError(f"data.unbalanced (--unbalanced) {self.unbalanced!r} must be a number >= 1: the ratio of the "
                              "first class's kept fraction to the last's (1 keeps every image, 10 keeps 1/10 of the last class)")


def decode_side(image_size: int) -> int:
    """Default bound on the decoded short side: twice the view size (448 px for 224 px views).

    ImageNet's photos are mostly about this size already; larger photos are shrunk once, when decoded, so
    a 12-megapixel folder costs what ImageNet costs per image, in decode time and in cache memory.
    """
    return 2 * image_size


def to_pixels(image: Image.Image, *, max_side: int | None) -> Tensor:
    """PIL RGB -> (3, H, W) uint8, the short side shrunk to at most `max_side` (antialiased, aspect kept)."""
    width, height = image.size
    short = min(width, height)
    if max_side is not None and short > max_side:
        scale = max_side / short
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)  # reducing_gap: fast box pre-shrink, exact enough
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class PixelCache:
    """Decoded images as one flat uint8 buffer in shared memory (forked workers read it without copies): this
    process's own, or a segment every process on the machine maps (`shared`)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.chunks: list[Tensor] = []
        self.offsets = torch.full((count,), -1, dtype=torch.int64)  # -1: not cached
        self.shapes = torch.zeros((count, 2), dtype=torch.int64)
        self.buffer: Tensor | None = None
        self.nbytes = 0
        self.segment: Path | None = None  # the shared segment's (by now unlinked) name in /dev/shm

    @classmethod
    def shared(cls, mapped: sharedcache.Mapped) -> PixelCache:
        """The cache in a mapped segment: views into the one mapping, nothing copied."""
        cache = cls(0)
        cache.count = len(mapped.index)
        cache.offsets, cache.shapes, cache.buffer = mapped.index[:, 0], mapped.index[:, 1:], mapped.data  # (N,), (N, 2)
        cached = cache.offsets >= 0
        cache.nbytes = int(3 * (cache.shapes[cached, 0] * cache.shapes[cached, 1]).sum())
        cache.segment = mapped.path
        return cache

    def add(self, index: int, pixels: Tensor) -> None:
        self.offsets[index] = self.nbytes
        self.shapes[index] = torch.tensor(pixels.shape[1:])
        self.chunks.append(pixels.reshape(-1))
        self.nbytes += pixels.numel()

    def seal(self) -> None:
        """Join the pieces into one shared buffer: one allocation, one mapping for every worker."""
        self.buffer = torch.cat(self.chunks) if self.chunks else torch.zeros(0, dtype=torch.uint8)
        self.buffer.share_memory_()
        self.chunks = []

    @property
    def cached(self) -> int:
        return int((self.offsets >= 0).sum())

    @property
    def complete(self) -> bool:
        """Every image is cached: batches need no decoding."""
        return bool((self.offsets >= 0).all())

    def __contains__(self, index: int) -> bool:
        return bool(self.offsets[index] >= 0)

    def get(self, index: int) -> Tensor:
        height, width = self.shapes[index].tolist()
        start = int(self.offsets[index])
        return self.buffer[start : start + 3 * height * width].view(3, height, width)


@dataclass(frozen=True)
class Skipped:
    """An image that could not be decoded and was replaced, for the main process to report."""

    index: int
    path: str  # the file's path as the file system gives it (undecodable bytes as surrogates), or "image N"
    reason: str


class PixelDataset(Dataset):
    """Item i: (uint8 (3, H, W), i, skipped) — image i's pixels, or the next decodable image's if i is bad.

    With `on_bad_image="error"` a bad image stops the run instead, naming it. `arrays` (N, H, W, 3) uint8
    serves datasets that are already pixels in memory (CIFAR, digits) without any decoding.
    """

    def __init__(self, images: Dataset, *, max_side: int | None, on_bad_image: str = "skip",
                 cache: PixelCache | None = None) -> None:
        self.images = decoded_at_least(images, max_side)  # JPEGs decoded at the smallest scale still covering max_side
        self.max_side = max_side
        self.on_bad_image = on_bad_image
        self.cache = cache
        self.arrays = _pixel_array(images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def decoding(self) -> bool:
        """Whether batches decode images (not copy in-memory arrays or a complete cache): what workers are for."""
        return self.arrays is None and (self.cache is None or not self.cache.complete)

    def __getitem__(self, index: int) -> tuple[Tensor, int, tuple[Skipped, ...]]:
        skipped = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self.pixels(candidate), index, tuple(skipped)
            except BadImage as exc:
                path = self.path(candidate)
                if self.on_bad_image == "error":
                    raise DataError(f"cannot decode {printable_path(path)} ({exc.reason}); fix or remove it, "
                                    "or pass --on-bad-image skip") from exc
                skipped.append(Skipped(candidate, path, exc.reason))
        # require_decodable stops a run on such data first; here the files changed since
        raise DataError(f"none of the {len(self)} images can be decoded now (first: {printable_path(skipped[0].path)}: "
                        f"{skipped[0].reason}); check the files")

    def pixels(self, index: int) -> Tensor:
        if self.arrays is not None:
            return torch.from_numpy(self.arrays[index]).permute(2, 0, 1)
        if self.cache is not None and index in self.cache:
            return self.cache.get(index)
        return to_pixels(self.images[index], max_side=self.max_side)

    def path(self, index: int) -> str:
        paths = getattr(self.images, "paths", None)
        return os.fspath(paths[index]) if paths is not None else f"image {index}"


def require_decodable(dataset: PixelDataset, bad: badfiles.BadFiles) -> None:
    """Before the first step: decode images in order until one works, handing each bad one before it to `bad`;
    when none works, the error naming the first few (and `bad`'s report listing them all), not a bare "no images"
    from inside a DataLoader worker. Usually one decode (or a cache hit)."""
    if dataset.arrays is not None:
        return  # pixels in memory: nothing to decode
    failures: list[tuple[str, str]] = []
    for index in range(len(dataset)):
        try:
            dataset.pixels(index)
        except BadImage as exc:
            failures.append((dataset.path(index), exc.reason))
            if bad.on_bad_image == "error":
                bad.add(*failures[-1])  # stops here, naming it
            continue
        for path, reason in failures:
            bad.add(path, reason)
        return
    raise bad.none_usable(failures)


def _pixel_array(images: Dataset) -> np.ndarray | None:
    """The (N, H, W, 3) uint8 array behind an in-memory dataset, if it has one."""
    inner = getattr(images, "dataset", images)  # Unlabelled(named dataset)
    array = getattr(inner, "images", None)
    if isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3:
        return array
    return None


@dataclass
class PixelBatch:
    """A padded uint8 batch: image b is pixels[b, :, :sizes[b, 0], :sizes[b, 1]] of dataset image indices[b]."""

    pixels: Tensor  # (B, 3, H, W) uint8
    sizes: Tensor  # (B, 2) int64 height, width
    indices: Tensor  # (B,) int64
    skipped: list[Skipped]

    def pin_memory(self) -> PixelBatch:  # DataLoader(pin_memory=True) calls this in its pinning thread
        return PixelBatch(self.pixels.pin_memory(), self.sizes, self.indices, self.skipped)


def collate(items: Sequence[tuple[Tensor, int, tuple[Skipped, ...]]]) -> PixelBatch:
    """Stack images into the top-left corners of one zero-padded (B, 3, H_max, W_max) batch."""
    sizes = torch.tensor([pixels.shape[1:] for pixels, _, _ in items], dtype=torch.int64)  # (B, 2)
    height, width = sizes.max(dim=0).values.tolist()
    if bool((sizes == sizes[0]).all()):
        batch = torch.stack([pixels for pixels, _, _ in items])  # the common case: one size (CIFAR, STL-10)
    else:
        batch = torch.zeros((len(items), 3, height, width), dtype=torch.uint8)
        for b, (pixels, _, _) in enumerate(items):
            batch[b, :, : pixels.shape[1], : pixels.shape[2]] = pixels
    indices = torch.tensor([index for _, index, _ in items], dtype=torch.int64)
    return PixelBatch(batch, sizes, indices, [s for _, _, skipped in items for s in skipped])


def default_cache_bytes() -> int:
    """Half the memory available at start, for the one cache of this machine's training processes."""
    return int(memory.available() * DEFAULT_CACHE_FRACTION)


@dataclass(frozen=True)
class Sharing:
    """What lets a machine's processes share one cache: a key naming the run and its data (the segment's name and
    fingerprint), this process's node, and the device the processes' collectives run on."""

    key: str
    node: distributed.Node
    device: torch.device
    shm_dir: Path = sharedcache.SHM_DIR


def build_cache(dataset: PixelDataset, *, budget: int, workers: int, sharing: Sharing | None = None,
                decode_device: torch.device = torch.device("cpu"),
                jpeg_decoder: decoders.JpegDecoder | None = None) -> PixelCache | None:
    """Decode every image once into memory when the dataset fits `budget` bytes (this machine's); None when it does not.

    With `sharing`, the machine's processes fill one cache in /dev/shm together, each decoding its share, and all map
    it (sharedcache); without it, or without a usable /dev/shm, each process decodes and keeps its own, in its part of
    the budget. The size is estimated from a sample first; if the estimate was low, caching stops at the budget and
    the rest is decoded each epoch. Bad images are left out (they are replaced and reported when drawn).
    """
    n = len(dataset)
    if dataset.arrays is not None or budget <= 0 or n == 0:
        return None
    local = sharing.node.local_size if sharing is not None else distributed.local_processes()
    if sharing is not None:
        free = _agreed_free_bytes(sharing)
        if free is not None:
            return _shared(dataset, budget=budget, free=free, workers=workers, sharing=sharing,
                           decode_device=decode_device, jpeg_decoder=jpeg_decoder)
        log.info("no shared memory at %s: each of this machine's %d process(es) decodes and caches its own copy of the "
                 "images", sharing.shm_dir, local)
    return _private(dataset, budget=budget // max(1, local), workers=workers, decode_device=decode_device,
                    jpeg_decoder=jpeg_decoder)


def _private(dataset: PixelDataset, *, budget: int, workers: int, decode_device: torch.device,
             jpeg_decoder: decoders.JpegDecoder | None) -> PixelCache | None:
    """This process's own cache of every image, in `budget` bytes."""
    n = len(dataset)
    estimate, sampled = _estimate(dataset, range(n), samples=SAMPLE_FOR_ESTIMATE, sharing=None)
    if not _fits(estimate, budget):
        return None
    log.info("decoding %d images once into memory (about %s of the %.1f GB budget)", n, _size(estimate), budget / BYTES_PER_GB)
    started = time.perf_counter()
    cache = PixelCache(n)
    for index, pixels in _decoded(dataset, range(n), sampled, workers=workers, device=decode_device, jpeg_decoder=jpeg_decoder):
        if pixels is None:
            continue
        if cache.nbytes + pixels.numel() > budget:
            log.info("the decoded images outgrew the %.1f GB budget after %d images; the rest are decoded every epoch",
                     budget / BYTES_PER_GB, len(cache.chunks))
            break
        cache.add(index, pixels)
    cache.seal()
    log.info("cached %d images in %.1f s: %s in this process", cache.cached, time.perf_counter() - started, _size(cache.nbytes))
    return cache


def _shared(dataset: PixelDataset, *, budget: int, free: int, workers: int, sharing: Sharing, decode_device: torch.device,
            jpeg_decoder: decoders.JpegDecoder | None) -> PixelCache | None:
    """One cache for the machine: each local process decodes its contiguous share into its slot of a segment in
    /dev/shm, then every process maps the whole. Every step is collective, so all processes take the same branch."""
    n, node, key = len(dataset), sharing.node, sharing.key
    share = distributed.shard(n, distributed.World(rank=node.local_rank, world_size=node.local_size))
    estimate, sampled = _estimate(dataset, share, samples=max(1, SAMPLE_FOR_ESTIMATE // node.local_size), sharing=sharing)
    if not _fits(estimate, budget):
        return None
    if estimate > free:
        log.info("%s has %s free, less than the decoded images need (about %s; a container's default is 64 MB, raised "
                 "with docker run --shm-size): each process caches its own copy", sharing.shm_dir, _size(free), _size(estimate))
        return _private(dataset, budget=budget // node.local_size, workers=workers, decode_device=decode_device,
                        jpeg_decoder=jpeg_decoder)
    log.info("decoding %d images once into shared memory, one copy for this machine's %d process(es) (about %s of the "
             "%.1f GB budget)", n, node.local_size, _size(estimate), budget / BYTES_PER_GB)
    started = time.perf_counter()
    path = sharedcache.segment_path(key, node=node.index, shm_dir=sharing.shm_dir)
    first = node.local_rank == 0

    def create() -> None:
        if first:
            sharedcache.sweep(sharing.shm_dir)
            sharedcache.create(path, key=key, count=n, slots=node.local_size,
                               slot_bytes=min(budget, free) // node.local_size)

    def fill() -> Tensor:
        writer = sharedcache.Writer(path, key=key, slot=node.local_rank, share=share)
        try:
            for index, pixels in _decoded(dataset, share, sampled, workers=workers, device=decode_device,
                                          jpeg_decoder=jpeg_decoder):
                if pixels is not None and not writer.put(index, pixels):
                    break
        finally:
            writer.close()
        return torch.tensor([writer.full == "budget", writer.full == "shared memory"], dtype=torch.int64)

    try:  # each step ends when every process has done it (on_every_rank), or stops them all
        distributed.on_every_rank(create, device=sharing.device)
        full = distributed.all_reduce_max(distributed.on_every_rank(fill, device=sharing.device).to(sharing.device)).tolist()
        distributed.on_every_rank(lambda: first and sharedcache.seal(path, key=key), device=sharing.device)
        mapped = distributed.on_every_rank(lambda: sharedcache.open_segment(path, key=key, count=n), device=sharing.device)
    finally:  # mapped by every process, or given up by all: the name can go (a kill -9 leaves it to `sweep`)
        if first:
            path.unlink(missing_ok=True)  # the memory stays until the last mapping goes, however that process ends
    cache = PixelCache.shared(mapped)
    if any(full):
        log.info("the decoded images outgrew the %s after %d of %d images; the rest are decoded every epoch",
                 f"{budget / BYTES_PER_GB:.1f} GB budget" if full[0] else f"free space of {sharing.shm_dir}", cache.cached, n)
    log.info("cached %d images in %.1f s: %s in %s, shared by this machine's %d process(es)", cache.cached,
             time.perf_counter() - started, _size(cache.nbytes), path, node.local_size)
    return cache


def _agreed_free_bytes(sharing: Sharing) -> int | None:
    """The free bytes in /dev/shm the least of all processes sees; None when any has none (they all fall back)."""
    free = sharedcache.free_bytes(sharing.shm_dir)
    worst = distributed.all_reduce_max(torch.tensor([1 if free is None else -free], dtype=torch.int64, device=sharing.device))
    return None if int(worst) > 0 else -int(worst)


def _estimate(dataset: PixelDataset, share: range, *, samples: int,
              sharing: Sharing | None) -> tuple[float, dict[int, Tensor | None]]:
    """Bytes the whole dataset takes decoded, from up to `samples` images of `share` (averaged over the processes
    with `sharing`); and the samples' pixels (None: bad), which the fill uses instead of decoding them again."""
    picks = np.linspace(share.start, share.stop - 1, num=min(len(share), samples)).round().astype(int) if len(share) else []
    sampled: dict[int, Tensor | None] = {}
    for index in picks:
        try:
            sampled[int(index)] = dataset.pixels(int(index))
        except BadImage:
            sampled[int(index)] = None
    sizes = [pixels.numel() for pixels in sampled.values() if pixels is not None]
    totals = torch.tensor([float(sum(sizes)), float(len(sizes))], dtype=torch.float64)
    if sharing is not None:
        totals = distributed.all_reduce_mean(totals.to(sharing.device)).cpu()  # the ratio is what counts
    return float(totals[0] / max(1.0, float(totals[1]))) * len(dataset), sampled


def _fits(estimate: float, budget: int) -> bool:
    if estimate > budget:
        log.info("not caching decoded images: about %.1f GB would exceed the %.1f GB budget (--cache-gb); decoding every epoch",
                 estimate / BYTES_PER_GB, budget / BYTES_PER_GB)
        return False
    return True


def _decoded(dataset: PixelDataset, indices: Iterable[int], sampled: dict[int, Tensor | None], *, workers: int,
             device: torch.device, jpeg_decoder: decoders.JpegDecoder | None) -> Iterable[tuple[int, Tensor | None]]:
    """Images `indices`, the sampled ones as they are, the others decoded now."""
    rest = [index for index in indices if index not in sampled]
    return itertools.chain(sampled.items(), decoders.decode(dataset, rest, workers=workers, device=device,
                                                            jpeg_decoder=jpeg_decoder))


def loader(dataset: PixelDataset, sampler: Sampler, *, local_batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Padded uint8 batches in the sampler's order; workers persist across epochs (no re-fork, caches stay warm)."""
    return DataLoader(
        dataset,
        batch_size=local_batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=_leave_stopping_to_the_main_process,
    )


def _leave_stopping_to_the_main_process(worker_id: int) -> None:
    """Workers leave stopping to the main process, which saves a checkpoint first.

    Ctrl-C reaches the whole process group: a worker ignores it and lives on until the main process shuts it
    down. A SIGTERM (sent to every process by some schedulers, and by the DataLoader itself at shutdown) ends a
    worker with exit code 0, which the main process does not treat as a crash.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def _size(nbytes: float) -> str:
    if nbytes >= BYTES_PER_GB / 10:
        return f"{nbytes / BYTES_PER_GB:.1f} GB"
    return f"{nbytes / 1024**2:.1f} MB" if nbytes >= 1024**2 / 10 else f"{nbytes / 1024:.1f} KB"


def cache_budget(cache_gb: float | None) -> int:
    """Bytes for this machine's cache: --cache-gb (already validated) or, unset, half the memory available."""
    if cache_gb is not None:
        return int(cache_gb * BYTES_PER_GB)
    return default_cache_bytes()
