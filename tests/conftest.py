"""Shared fixtures: small folders of generated images, so no test needs a download."""

from __future__ import annotations

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
