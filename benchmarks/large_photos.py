"""Write a folder of phone-sized photos (12 megapixels by default) to benchmark decoding with, no download needed.

Each image is one of the two photos that ship with scikit-learn (a temple in China, a flower; 640 x 427),
randomly cropped, flipped, upscaled to --size and overlaid with sensor-like noise, then saved as a JPEG at
quality 90: about the bytes and the decode cost of a camera's photo.

    python benchmarks/large_photos.py /tmp/large_photos --count 12 --size 4000x3000

With --embed-rounds R it then times `simclr embed` of the folder (a ResNet-18 of random weights at 224 px, the
engine's embed_folder in this process) against the same embed with every JPEG decoded at full size (the
reduced-size decode turned off: PIL's plain decode, then the same resize), R interleaved rounds, medians:

    python benchmarks/large_photos.py /tmp/large_photos --count 24 --embed-rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
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


def time_embed(folder: Path, *, rounds: int, batch_size: int = 12) -> dict:
    """Images/s of embed_folder with the reduced-size decode (ours) and with full-size decodes, interleaved."""
    import torch

    from retrieval import write_encoder
    from simclr_cli.engine import features
    from simclr_cli.engine.device import Runtime
    from simclr_cli.engine.tasks import embed

    cpu = Runtime(device=torch.device("cpu"), precision="fp32")
    reduced = embed.decode_side_for
    decodes = {"reduced_decode": reduced, "full_decode": lambda encoder: None}  # None: decoded_at_least keeps full size
    rates: dict[str, list[float]] = {name: [] for name in decodes}
    with tempfile.TemporaryDirectory() as scratch:
        encoder = features.open_encoder(write_encoder(Path(scratch) / "enc.safetensors", width=1.0, image_size=224))
        for _ in range(rounds):
            for name, decode_side in decodes.items():
                embed.decode_side_for = decode_side
                started = time.perf_counter()
                result = embed.embed_folder(encoder, folder, out=Path(scratch) / f"{name}.npy", batch_size=batch_size,
                                            rt=cpu, overwrite=True)
                rates[name].append(result.rows / (time.perf_counter() - started))
        embed.decode_side_for = reduced
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"images": result.rows, "threads": torch.get_num_threads(), "load_average": [round(v, 2) for v in os.getloadavg()],
            **{f"{name}_images_per_s": [round(v, 3) for v in values] for name, values in rates.items()},
            **{f"{name}_median_images_per_s": round(value, 3) for name, value in medians.items()},
            "speedup": round(medians["reduced_decode"] / medians["full_decode"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the photos to")
    parser.add_argument("--count", type=int, default=12, help="number of photos (default 12)")
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT in pixels (default 4000x3000, 12 Mpx)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-rounds", type=int, default=0, help="then time embed, reduced vs full decode, this many rounds")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    write_photos(args.out, count=args.count, size=(width, height), seed=args.seed)
    print(f"wrote {args.count} {width}x{height} JPEG photos to {args.out}")
    if args.embed_rounds:
        print(json.dumps(time_embed(args.out, rounds=args.embed_rounds), indent=2))


if __name__ == "__main__":
    main()
