"""Pretraining throughput on the same images as a folder and as tar shards, at the same config, in one run.

Writes COUNT photo crops (benchmarks/photo_crops.py) as a folder, converts it with `simclr shard`, then runs
`simclr benchmark` on each in interleaved rounds (folder, shards, folder, ...) with the decoded-image cache off,
so that every step reads and decodes its images from the files: the pretrain loop's images/s and the input
pipeline's views/s on one core, medians over --rounds. Both read the same bytes; what differs is how: one
open() per image, or a seek and a read in a tar file that stays open.

    python benchmarks/shards_vs_folder.py /tmp/shards_vs_folder --count 2048 --size 96 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from photo_crops import write_crops

FIGURES = ("pretrain_images_per_s", "data_views_per_s_per_core", "data_wait_fraction")


def benchmark(source: str, *, image_size: int, batch_size: int, steps: int) -> dict:
    command = [sys.executable, "-m", "simclr_cli", "benchmark", source, "--arch", "resnet18", "--width", "0.25",
               "--image-size", str(image_size), "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", "1",
               "--repeats", "1", "--no-baseline", "--device", "cpu", "--precision", "fp32", "--set", "data.cache_gb=0",
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where to write the folder and the shards (deleted afterwards unless --keep)")
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--size", type=int, default=96, help="side of the JPEG crops, px")
    parser.add_argument("--image-size", type=int, default=64, help="the views' side, px")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder, shards = args.root / "folder", args.root / "shards"
    try:
        write_crops(folder, count=args.count, size=args.size)
        subprocess.run([sys.executable, "-m", "simclr_cli", "shard", str(folder), "-o", str(shards), "--shard-size",
                        str(args.shard_size)], check=True, capture_output=True)
        sources = {"folder": str(folder), "shards": str(shards)}
        rounds: dict[str, list[dict]] = {name: [] for name in sources}
        load = [os.getloadavg()]
        for _ in range(args.rounds):
            for name, source in sources.items():
                rounds[name].append(benchmark(source, image_size=args.image_size, batch_size=args.batch_size, steps=args.steps))
        load.append(os.getloadavg())
        results: dict = {"images": args.count, "crop_px": args.size, "image_size": args.image_size,
                         "batch_size": args.batch_size, "load_average_before_after": [[round(v, 2) for v in l] for l in load]}
        for name, measured in rounds.items():
            results[name] = {figure: round(statistics.median(m[figure] for m in measured), 4) for figure in FIGURES}
            results[name]["pretrain_images_per_s_each"] = [m["pretrain_images_per_s"] for m in measured]
        results["shards_over_folder"] = {figure: round(results["shards"][figure] / results["folder"][figure], 3)
                                         for figure in FIGURES[:2]}
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
