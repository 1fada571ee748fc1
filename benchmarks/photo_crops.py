"""Write a folder of small real-photo crops to benchmark with: CIFAR-sized images, no download needed.

The photos are the two that ship with scikit-learn (sklearn.datasets.load_sample_images: a temple in China
and a flower); each output image is a random square crop, resized to --size px and saved as JPEG, so the
pipeline pays a real decode per image, as it would on a folder of photos.

    python benchmarks/photo_crops.py benchmarks/photos32 --count 2560 --size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def write_crops(out: Path, *, count: int, size: int, seed: int = 0) -> None:
    photos = [Image.fromarray(image) for image in load_sample_images().images]  # 427 x 640 RGB each
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(photo.size) + 1))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        crop.save(out / f"crop_{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the crops to")
    parser.add_argument("--count", type=int, default=2560, help="number of images (default 2560)")
    parser.add_argument("--size", type=int, default=32, help="side of each square image in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_crops(args.out, count=args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} {args.size}x{args.size} JPEG crops to {args.out}")


if __name__ == "__main__":
    main()
