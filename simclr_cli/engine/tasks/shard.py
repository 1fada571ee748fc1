"""`simclr shard`: a folder of images as tar shards in the WebDataset layout (see engine/shards.py), converted once
so that pretrain and embed read a few large files instead of millions of small ones."""

from __future__ import annotations

from pathlib import Path

from simclr_cli.engine import shards
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS


def run(*, folder: Path, out: Path, shard_size: int, max_side: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = False) -> shards.ShardResult:
    """Write FOLDER's images to OUT/shard-000000.tar, ... (`max_image_pixels` 0 = no limit)."""
    return shards.write_shards(folder, out, shard_size=shard_size, max_side=max_side,
                               max_pixels=(DEFAULT_MAX_PIXELS if max_image_pixels is None else max_image_pixels) or None,
                               overwrite=overwrite)
