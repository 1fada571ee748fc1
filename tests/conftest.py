"""Shared fixtures: small folders of generated images, so no test needs a download."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite's models are tiny: intra-op threads gain nothing, and on a busy 2-core machine their
    spin-waits made single tests swing from a fraction of a second to tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder: Path, count: int, *, size: int = 20, seed: int = 0, suffix: str = ".png") -> list[Path]:
    """`count` random-texture RGB images of `size` px; distinct so augmentations and losses are non-trivial."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """24 generated images in nested folders."""
    root = tmp_path / "images"
    write_images(root / "a", 12, seed=1)
    write_images(root / "b" / "c", 12, seed=2, suffix=".JPG")
    return root


def write_hostile_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """Good photos and every kind of file that must be decoded (by its rule) or skipped (with its reason)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / f"photo{i}.jpg", quality=90)
    good_jpeg = (root / "photo0.jpg").read_bytes()
    Image.new("CMYK", (20, 20), (100, 50, 0, 30)).save(root / "cmyk.jpg")
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 160).save(root / "sixteen.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(root / "rgba.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.save(root / "palette.png", transparency=1)
    turned = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(root / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (5, 6, 7)).save(root / "tiny.png")
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "fake.jpg").write_text("<html>not a photo</html>")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # a 400-megapixel header, a few bytes on disk

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    decoded = ["cmyk.jpg", "palette.png", "photo0.jpg", "photo1.jpg", "photo2.jpg", "rgba.png", "rotated.jpg", "sixteen.png", "tiny.png"]
    skipped = {"bomb.png": "20000x20000 = 400.0 Mpx exceeds the 179.0 Mpx limit; raise --max-image-pixels",
               "empty.jpg": "empty file (0 bytes)", "fake.jpg": "not an image", "truncated.jpg": "truncated file"}
    return decoded, skipped
