#!/usr/bin/env bash
# Rebuild the README gallery from the built-in demo: SimCLR on scikit-learn's digits (about 5 minutes on 2 CPU cores).
# Run from the repository root with `simclr` on PATH (pip install -e '.[plots]'):  bash docs/gallery/make.sh
# Every number in the images comes from this run; set WORK=<dir> to keep the intermediate files.
set -euo pipefail

gallery="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${WORK:-$(mktemp -d)}"
echo "working in $work"

simclr pretrain --out "$work/demo" --monitor-knn digits --overwrite
simclr linear-eval "$work/demo/encoder.safetensors" --out "$work/lin"

# the digits val split as PNGs in class folders, so `embed` sees the 359 images linear-eval scored and
# `--plot` colours them by class
python -c '
import sys
from pathlib import Path
from simclr_cli.engine.datasets import digits
out = Path(sys.argv[1])
for i, (image, label) in enumerate(digits("val")):
    (out / str(label)).mkdir(parents=True, exist_ok=True)
    image.save(out / str(label) / f"{i:04d}.png")
' "$work/val"
simclr embed "$work/val" -o "$work/vecs.npy" -c "$work/demo/encoder.safetensors" --plot --overwrite

# README "Comparing encoders": the encoder, its untrained twin and a fine-tuning on 10% of the labels
simclr finetune "$work/demo/encoder.safetensors" --label-fraction 0.1 --out "$work/ft"
simclr compare "$work/demo/encoder.safetensors" "$work/ft/finetuned.safetensors" --random-init --data digits --out "$work/cmp"

cp "$work/demo/loss.png" "$gallery/demo-loss.png"
cp "$work/demo/knn.png" "$gallery/demo-knn.png"
cp "$work/lin/confusion.png" "$gallery/demo-confusion.png"
cp "$work/vecs.png" "$gallery/demo-embedding.png"
cp "$work/cmp/compare.png" "$gallery/demo-compare.png"
ls -l "$gallery"/demo-*.png
