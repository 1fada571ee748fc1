"""Decoding a share of the images once, to fill the cache: on the CPU in DataLoader workers, or, on a CUDA device,
plain JPEGs in batches on the GPU (nvJPEG through torchvision) and every other image on the CPU.

The GPU path is thin on purpose: workers read the bytes and screen them (images.plain_jpeg_pixels), the main process
decodes a batch on the device and shrinks it there as `pipeline.to_pixels` does (bicubic, antialiased), and any batch
the GPU fails on is decoded on the CPU instead, after a one-line note. Only the CPU side of this is tested here (with
torchvision's CPU decoder standing in for nvJPEG); the CUDA call itself has not run on this project's test machine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from simclr_cli.engine.errors import BadImage
from simclr_cli.engine.images import plain_jpeg_pixels

log = logging.getLogger("simclr")

DECODE_DEVICES = ("auto", "cpu", "cuda")
GPU_BATCH_IMAGES = 64  # JPEGs per nvJPEG call
GPU_BATCH_PIXELS = 64_000_000  # full-size pixels per call: ~200 MB of RGB on the device (five 12-megapixel photos)

Decoded = tuple[int, Tensor | None]  # (dataset index, (3, H, W) uint8 pixels; None when the image cannot be decoded)
JpegDecoder = Callable[[list[Tensor], torch.device], list[Tensor]]  # encoded bytes -> (3, H, W) uint8 on the device


def resolve(setting: str, *, train_device: torch.device) -> torch.device:
    """Where the cache is filled, from data.decode_device (validated, one of DECODE_DEVICES): `auto` is the training
    device when it is a GPU, else the CPU; `cuda` without CUDA is the CPU, after a one-line note."""
    if setting == "cpu" or (setting == "auto" and train_device.type != "cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.info("data.decode_device is cuda but PyTorch sees no CUDA GPU; decoding the images on the CPU")
        return torch.device("cpu")
    return train_device if train_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def decode(dataset, indices: Sequence[int], *, workers: int, device: torch.device,
           jpeg_decoder: JpegDecoder | None = None) -> Iterator[Decoded]:
    """Images `indices` of a pipeline.PixelDataset decoded once each, shrunk to its `max_side`, in any order.

    On a CUDA `device` (or with a `jpeg_decoder` given, as tests do), JPEGs go through the batched GPU path when the
    dataset can hand out encoded bytes (files, shards); everything else is decoded by the dataset in `workers` workers.
    """
    if (device.type == "cuda" or jpeg_decoder is not None) and hasattr(dataset.images, "read_bytes"):
        yield from _on_gpu(dataset, indices, workers=workers, device=device, jpeg_decoder=jpeg_decoder or _nvjpeg)
    else:
        yield from DataLoader(_Pixels(dataset, indices), batch_size=None, num_workers=workers)


class _Pixels(Dataset):
    """Item k: (indices[k], its pixels or None when it cannot be decoded)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Decoded:
        return _on_cpu(self.dataset, self.indices[k])


def _on_cpu(dataset, index: int) -> Decoded:
    try:
        return index, dataset.pixels(index)
    except BadImage:
        return index, None


class _Encoded(Dataset):
    """Item k: (index, a plain JPEG's bytes as a uint8 tensor, its pixel count), or, for any other image, (index, its
    pixels decoded here on the CPU or None, 0)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, Tensor | None, int]:
        index = self.indices[k]
        try:
            data = self.dataset.images.read_bytes(index)
        except BadImage:
            return index, None, 0
        pixels = plain_jpeg_pixels(data, max_pixels=self.dataset.images.max_pixels)
        if pixels is None:
            return (*_on_cpu(self.dataset, index), 0)
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), pixels


class JpegBatch:
    """The JPEGs waiting for one decoder call: at most GPU_BATCH_IMAGES of them and GPU_BATCH_PIXELS full-size pixels
    (a single larger image goes alone)."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.data: list[Tensor] = []
        self.pixels = 0

    def fits(self, pixels: int) -> bool:
        return not self.indices or (len(self.indices) < GPU_BATCH_IMAGES and self.pixels + pixels <= GPU_BATCH_PIXELS)

    def add(self, index: int, data: Tensor, pixels: int) -> None:
        self.indices.append(index)
        self.data.append(data)
        self.pixels += pixels

    def __len__(self) -> int:
        return len(self.indices)


def _on_gpu(dataset, indices: Sequence[int], *, workers: int, device: torch.device,
            jpeg_decoder: JpegDecoder) -> Iterator[Decoded]:
    batch, failed = JpegBatch(), False
    for index, payload, pixels in DataLoader(_Encoded(dataset, indices), batch_size=None, num_workers=workers):
        if not pixels:  # decoded (or found bad) on the CPU by a worker
            yield index, payload
            continue
        if not batch.fits(pixels):
            decoded, failed = _flush(dataset, batch, device=device, jpeg_decoder=jpeg_decoder, noted=failed)
            yield from decoded
            batch = JpegBatch()
        batch.add(index, payload, pixels)
    if batch:
        decoded, _ = _flush(dataset, batch, device=device, jpeg_decoder=jpeg_decoder, noted=failed)
        yield from decoded


def _flush(dataset, batch: JpegBatch, *, device: torch.device, jpeg_decoder: JpegDecoder,
           noted: bool) -> tuple[list[Decoded], bool]:
    """The batch decoded on the device and shrunk there; on any failure, decoded on the CPU (noted once a run)."""
    try:
        images = jpeg_decoder(batch.data, device)
        return [(index, shrink(image, dataset.max_side).cpu()) for index, image in zip(batch.indices, images, strict=True)], noted
    except Exception as exc:  # noqa: BLE001 - nvJPEG's errors are RuntimeErrors of every wording; the CPU path is exact
        if not noted:
            log.info("decoding JPEGs on %s failed (%s); decoding those on the CPU", device, str(exc).splitlines()[0][:200])
        return [_on_cpu(dataset, index) for index in batch.indices], True


def shrink(pixels: Tensor, max_side: int | None) -> Tensor:
    """(3, H, W) uint8 with the short side shrunk to at most `max_side`, as pipeline.to_pixels does it with PIL."""
    height, width = pixels.shape[1:]
    short = min(height, width)
    if max_side is None or short <= max_side:
        return pixels
    scale = max_side / short
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate(pixels[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)  # (3, h, w)


def _nvjpeg(data: list[Tensor], device: torch.device) -> list[Tensor]:
    """torchvision's batched nvJPEG decode (untested here: no GPU on the test machine)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec; the call still works
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
