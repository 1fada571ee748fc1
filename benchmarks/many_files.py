"""Measure image discovery and the time to the first step on a tree of many tiny files (200,000 by default).

Writes COUNT 8x8 images (JPEG and PNG, 64 distinct ones, repeated) into FOLDERS top-level folders of 10
subfolders each, then times, each in a fresh process so its peak memory is its own:
- the folder walk alone (images.walk_images) with 1 and with 16 listing threads, in --repeats interleaved rounds
  (medians, and each round's figures);
- `simclr pretrain TREE --max-steps 1` (discovery, data fingerprint, first decode, one step), and
- `simclr pretrain --resume` of that finished run (the saved files.txt read back, the fingerprint checked).
The tree is deleted afterwards unless --keep is given.

    python benchmarks/many_files.py /tmp/many_files --count 200000 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SUBFOLDERS = 10


def write_tree(root: Path, *, count: int, folders: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG" if i % 2 else "PNG")
        encoded.append((".jpg" if i % 2 else ".png", buffer.getvalue()))
    leaves = [root / f"f{top:04d}" / f"s{sub:02d}" for top in range(folders) for sub in range(SUBFOLDERS)]
    for leaf in leaves:
        leaf.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        suffix, data = encoded[i % len(encoded)]
        (leaves[i % len(leaves)] / f"img_{i:07d}{suffix}").write_bytes(data)


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB, stderr) of one command run to its end (GNU time reads the peak)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    said, _, peak_kb = done.stderr.rstrip().rpartition("\n")
    return seconds, int(peak_kb) / 1024, said


# The walk's own memory: the peak after it minus the peak before (importing torch, which the module needs, is most of it).
WALK = ("import resource, sys, time; from pathlib import Path; from simclr_cli.engine.images import walk_images; "
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; before = peak(); "
        "t = time.perf_counter(); n = len(walk_images(Path(sys.argv[1]), threads=int(sys.argv[2])).images); "
        "print(n, time.perf_counter() - t, peak() - before, file=sys.stderr)")


def measure(root: Path, *, runs: Path, repeats: int = 1) -> dict:
    results: dict = {"load_average_before": [round(v, 2) for v in os.getloadavg()]}
    rounds: dict[int, list[dict]] = {1: [], 16: []}
    for _ in range(repeats):
        for threads in rounds:
            seconds, peak, said = timed([sys.executable, "-c", WALK, str(root), str(threads)])
            found, walk_seconds, walk_mb = said.split()[-3:]
            rounds[threads].append({"images": int(found), "walk_seconds": float(walk_seconds), "walk_memory_mb": float(walk_mb),
                                    "process_seconds": seconds, "process_peak_rss_mb": peak})
    for threads, measured in rounds.items():
        results[f"walk_{threads}_threads"] = {
            "images": measured[0]["images"], "walk_seconds_each": [round(m["walk_seconds"], 2) for m in measured],
            **{key: round(statistics.median(m[key] for m in measured), 2)
               for key in ("walk_seconds", "walk_memory_mb", "process_seconds", "process_peak_rss_mb")}}
    simclr = [sys.executable, "-m", "simclr_cli"]
    out = runs / "run"
    first = [*simclr, "pretrain", str(root), "--out", str(out), "--max-steps", "1", "--arch", "resnet18", "--width", "0.25",
             "--image-size", "8", "--batch-size", "256", "--cache-gb", "0", "--workers", "0", "--device", "cpu",
             "--precision", "fp32"]
    seconds, peak, _ = timed(first)
    results["pretrain_first_step"] = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}
    seconds, peak, _ = timed([*simclr, "pretrain", "--resume", "--out", str(out), "--workers", "0"])
    results["resume_with_saved_list"] = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where to write the tree (deleted afterwards unless --keep)")
    parser.add_argument("--count", type=int, default=200_000, help="number of image files (default 200000)")
    parser.add_argument("--folders", type=int, default=200, help=f"top-level folders, each with {SUBFOLDERS} subfolders")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the two walks (medians reported)")
    parser.add_argument("--keep", action="store_true", help="keep the tree and the run folder")
    args = parser.parse_args()
    started = time.perf_counter()
    write_tree(args.root / "tree", count=args.count, folders=args.folders)
    print(f"wrote {args.count} files in {args.folders * SUBFOLDERS} folders in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        print(json.dumps(measure(args.root / "tree", runs=args.root, repeats=args.repeats), indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.root)


if __name__ == "__main__":
    main()
