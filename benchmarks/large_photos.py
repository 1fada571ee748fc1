"""Write a folder of phone-sized photos (12 megapixels by default) to benchmark decoding with, no download needed.

Each image is one of the two photos that ship with scikit-learn (a temple in China, a flower; 640 x 427),
randomly cropped, flipped, upscaled to --size and overlaid with sensor-like noise, then saved as a JPEG at
quality 90: about the bytes and the decode cost of a camera's photo.

    python benchmarks/large_photos.py /tmp/large_photos --count 12 --size 4000x3000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

NOISE = 12  # +- levels of 255: what a phone sensor leaves at moderate ISO, and what keeps the JPEG photo-sized


def write_photos(out: Path, *, count: int, size: tuple[int, int], seed: int = 0) -> None:
    photos = [Image.fromarray(image) for image in load_sample_images().images]  # 640 x 427 RGB each
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(count):
        photo = photos[i % len(photos)]
        crop_w = int(rng.integers(photo.width // 2, photo.width + 1))
        crop_h = max(1, round(crop_w * height / width))
        crop_h = min(crop_h, photo.height)
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image).astype(np.int16)  # (H, W, 3)
        pixels += rng.integers(-NOISE, NOISE + 1, size=pixels.shape, dtype=np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / f"photo_{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the photos to")
    parser.add_argument("--count", type=int, default=12, help="number of photos (default 12)")
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT in pixels (default 4000x3000, 12 Mpx)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    write_photos(args.out, count=args.count, size=(width, height), seed=args.seed)
    print(f"wrote {args.count} {width}x{height} JPEG photos to {args.out}")


if __name__ == "__main__":
    main()
