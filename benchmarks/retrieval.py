"""Measure retrieval latency over a large index (1,000,000 x 512 by default): the search alone and the whole command.

Writes a random float32 index as `simclr embed --normalize` would (VECS.npy of unit rows, VECS.paths.txt, VECS.json)
and a ResNet-18 encoder of random weights whose h has the index's width (512), then times, with the page cache warm:
- the exact search alone on the memory-mapped rows, one query at a time, in interleaved rounds (median of
  --repeats): neighbours.nearest told the rows are unit (what retrieval does for a normalised index), the same
  computing the row norms (any index), and the baseline: the search as it was before (a float copy and a
  normalised copy of every chunk, in torch). Each query is an index row plus noise, so its nearest row is known
  and checked;
- a batch of 100 queries (the time per query);
- `simclr knn --index VECS.npy --query IMAGE -k 5` end to end (start-up, the encoder, reading the names, the
  search), median of 3.
The files are deleted afterwards unless --keep is given.

    python benchmarks/retrieval.py /tmp/retrieval --rows 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from PIL import Image

from simclr_cli.engine import features, index
from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.neighbours import nearest

BLOCK = 65536  # rows written at a time
K = 5


def write_index(out: Path, *, rows: int, dim: int, checkpoint: Path, seed: int = 0) -> Path:
    vectors = out / "vecs.npy"
    rng = np.random.default_rng(seed)
    array = open_memmap(vectors, mode="w+", dtype=np.float32, shape=(rows, dim))  # (N, D)
    for start in range(0, rows, BLOCK):
        block = rng.standard_normal((min(BLOCK, rows - start), dim), dtype=np.float32)  # (B, D)
        array[start : start + BLOCK] = block / np.linalg.norm(block, axis=1, keepdims=True)
    array.flush()
    del array
    index.write_paths(index.paths_file_for(vectors), [f"img_{i:07d}.jpg" for i in range(rows)])
    encoder = features.open_encoder(checkpoint)
    index.write_metadata(vectors, {"checkpoint": str(checkpoint), "checkpoint_sha256": encoder.digest, "layer": "encoder",
                                   "normalize": True, "rows": rows, "dim": dim})
    return vectors


def write_encoder(path: Path, *, width: float, image_size: int = 32) -> Path:
    """A ResNet-18 encoder file of random weights (h is 512 x width wide)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=width).resolved(image_size=image_size)
    info = EncoderInfo(model=cfg, image_size=image_size, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                       config={}, epoch=1, step=1)
    save_encoder(path, build_model(cfg), info=info)
    return path


def copy_and_normalise(rows: np.ndarray, queries: torch.Tensor, *, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The search before: each chunk copied to a float tensor and normalised, then multiplied (one query chunk)."""
    q = F.normalize(queries, dim=1)  # (Q, D)
    best = None
    for b0 in range(0, len(rows), chunk):
        keys = F.normalize(torch.from_numpy(np.array(rows[b0 : b0 + chunk], dtype=np.float32)), dim=1)  # (Bc, D)
        top = (q @ keys.T).topk(min(k, len(keys)), dim=1)
        values, indices = top.values, top.indices + b0
        if best is not None:
            values, indices = torch.cat([best[0], values], dim=1), torch.cat([best[1], indices], dim=1)
            keep = values.topk(k, dim=1).indices
            values, indices = values.gather(1, keep), indices.gather(1, keep)
        best = (values, indices)
    return best


SEARCHES = {
    "unit_rows": lambda rows, q: nearest(rows, q, k=K, unit_rows=True),
    "row_norms": lambda rows, q: nearest(rows, q, k=K),
    "baseline_copy_and_normalise": lambda rows, q: copy_and_normalise(rows, q, k=K),
}


def time_search(vectors: Path, *, repeats: int, batch: int, seed: int = 1) -> dict:
    rows = np.load(vectors, mmap_mode="r")  # (N, D)
    rng = np.random.default_rng(seed)
    seconds: dict[str, list[float]] = {name: [] for name in SEARCHES}
    for n, pick in enumerate(rng.integers(0, len(rows), repeats + 1)):
        query = torch.from_numpy(rows[pick] + 0.1 * rng.standard_normal(rows.shape[1], dtype=np.float32))[None]  # (1, D)
        for name, search in SEARCHES.items():
            started = time.perf_counter()
            _, found = search(rows, query)
            elapsed = time.perf_counter() - started
            if int(found[0, 0]) != pick:
                sys.exit(f"{name}: the query near row {pick} found row {int(found[0, 0])} first: the search is wrong")
            if n:  # the first round warms the page cache
                seconds[name].append(elapsed)
    picks = rng.integers(0, len(rows), batch)
    queries = torch.from_numpy(rows[np.sort(picks)] + 0.1 * rng.standard_normal((batch, rows.shape[1]), dtype=np.float32))
    started = time.perf_counter()
    nearest(rows, queries, k=K, unit_rows=True)
    batched = time.perf_counter() - started
    results = {f"{name}_s": [round(s, 3) for s in values] for name, values in seconds.items()}
    results |= {f"{name}_median_s": round(statistics.median(values), 3) for name, values in seconds.items()}
    return results | {f"batch_of_{batch}_s": round(batched, 3), "batched_per_query_s": round(batched / batch, 4)}


def time_command(vectors: Path, *, image: Path, repeats: int) -> dict:
    command = [sys.executable, "-m", "simclr_cli", "knn", "--index", str(vectors), "--query", str(image), "-k", str(K),
               "--device", "cpu", "--workers", "0"]
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"command_s": [round(s, 2) for s in seconds], "command_median_s": round(statistics.median(seconds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the index (deleted afterwards unless --keep)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512, help="512: ResNet-18's h (simclr embed's default layer)")
    parser.add_argument("--repeats", type=int, default=9, help="single queries timed (median reported)")
    parser.add_argument("--batch", type=int, default=100, help="queries in the batched search")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = write_encoder(args.out / "encoder.safetensors", width=args.dim / 512)
        started = time.perf_counter()
        vectors = write_index(args.out, rows=args.rows, dim=args.dim, checkpoint=checkpoint)
        print(f"wrote a {args.rows} x {args.dim} index in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        image = args.out / "query.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        results = {"rows": args.rows, "dim": args.dim, "threads": torch.get_num_threads(),
                   "load_average": os.getloadavg(), **time_search(vectors, repeats=args.repeats, batch=args.batch),
                   **time_command(vectors, image=image, repeats=3)}
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
