"""Representation quality at equal budget: `simclr pretrain` against the peer recipe, scored by the same probes.

Both encoders train on the same unlabelled images for the same number of images seen (epochs x images), at
the same batch, resolution, precision and seed; then both are scored by ONE feature path (a torchvision
ResNet-18 with the CIFAR stem holding the encoder's weights, the same test-time transform) and ONE pair of
probes written here, independent of simclr's own evaluation code:

- kNN (Wu et al. 2018): L2-normalised features, cosine similarity, k = 20, votes exp(sim / 0.1);
- linear: scikit-learn's L-BFGS logistic regression on standardised features.

Datasets are real images that ship with scikit-learn, written as image folders:

- digits: the 1,797 handwritten digits upscaled to 28 px grayscale; 1,397 to pretrain on and to train the
  probes, 400 held out (stratified, fixed seed);
- photos: 32 px crops of the two sample photos (a temple and a flower); the label is which photo and which
  quadrant the crop is centred in (8 classes); 2,000 to pretrain on and train the probes, 500 held out.

The peer is lightly's documented SimCLR recipe (benchmarks/peer_simclr.py), run under a separate Python
that has `lightly` installed (not a dependency of simclr):

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch torchvision lightly safetensors scikit-learn
    python benchmarks/quality.py --peer-python /tmp/peer/bin/python --seeds 0 1 2 --out quality.jsonl

Rows are named variants of `simclr pretrain` flags (`--variant NAME='--flags ...'`), so every ablation is one
more row; finished runs are read back from --out, so an interrupted benchmark resumes. Prints a Markdown table
of mean and spread (min-max) over seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits, load_sample_images
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchvision.transforms import v2

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KNN_K, KNN_T = 20, 0.1
PEER = "peer"
RANDOM = {"ours-random-init": "ours", "peer-random-init": "peer"}


# ---- data -----------------------------------------------------------------------------------------------


def write_digits(root: Path, *, size: int = 28, held_out: int = 400) -> None:
    bunch = load_digits()
    images = (bunch.images / 16.0 * 255).round().astype(np.uint8)  # (N, 8, 8) in 0..16 -> 0..255
    rng = np.random.default_rng(123)
    test = set()
    for label in range(10):  # stratified: the same share of every class held out
        members = np.flatnonzero(bunch.target == label)
        test.update(rng.choice(members, size=round(held_out * len(members) / len(images)), replace=False).tolist())
    for i, (pixels, label) in enumerate(zip(images, bunch.target)):
        image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC)
        _save(root, image, split="test" if i in test else "train", label=int(label), name=f"digit_{i:04d}.png")


def write_photo_crops(root: Path, *, size: int = 32, train: int = 2000, held_out: int = 500) -> None:
    photos = [Image.fromarray(image) for image in load_sample_images().images]  # 2 photos, 427 x 640
    rng = np.random.default_rng(123)
    for i in range(train + held_out):
        which = i % len(photos)
        photo = photos[which]
        side = int(rng.integers(size, 161))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        quadrant = 2 * int(top + side / 2 >= photo.height / 2) + int(left + side / 2 >= photo.width / 2)
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        _save(root, crop, split="train" if i < train else "test", label=4 * which + quadrant, name=f"crop_{i:05d}.png")


def _save(root: Path, image: Image.Image, *, split: str, label: int, name: str) -> None:
    folder = root / split / f"{label:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    if split == "train":  # the pretraining folder holds the same images without labels
        (root / "unlabelled").mkdir(exist_ok=True)
        (root / "unlabelled" / name).symlink_to(folder / name)


DATASETS = {"digits": write_digits, "photos": write_photo_crops}


def labelled(root: Path, split: str) -> tuple[list[Path], np.ndarray]:
    paths = sorted((root / split).rglob("*.png"))
    return paths, np.array([int(p.parent.name) for p in paths])


# ---- encoders -------------------------------------------------------------------------------------------


def small_stem_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem and no classifier: (B, 3, S, S) -> h (B, 512)."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def load_ours(path: Path) -> nn.Module:
    """A simclr encoder.safetensors as the same torchvision module (simclr keeps torchvision's layer names)."""
    tensors = load_file(str(path))
    net = small_stem_resnet18()
    net.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}, strict=True)
    return net


def load_peer(path: Path) -> nn.Module:
    net = small_stem_resnet18()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net


def ours_random_init(seed: int) -> nn.Module:
    """What `simclr knn --random-init` evaluates: simclr's own ResNet-18 (CIFAR stem), freshly initialised."""
    from simclr_cli.engine.model import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="resnet18", stem="small"))
    net = small_stem_resnet18()
    net.load_state_dict(model.encoder.state_dict(), strict=True)
    return net


@torch.no_grad()
def features(net: nn.Module, paths: list[Path], *, size: int, precision: str) -> torch.Tensor:
    """h for each image under the test-time transform simclr uses at <= 64 px (resize to S x S, ImageNet stats)."""
    transform = v2.Compose([
        v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    net.eval()
    rows = []
    for start in range(0, len(paths), 256):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + 256]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            rows.append(net(x).float())
    return torch.cat(rows)


# ---- probes ---------------------------------------------------------------------------------------------


def knn_top1(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, test_y: np.ndarray) -> float:
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    sim, idx = (test @ train.T).topk(KNN_K, dim=1)  # (M, k)
    classes = int(max(train_y.max(), test_y.max())) + 1
    labels = torch.as_tensor(train_y)[idx]
    votes = torch.zeros(len(test), classes).scatter_add_(1, labels, (sim / KNN_T).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def linear_top1(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, test_y: np.ndarray) -> float:
    scaler = StandardScaler().fit(train.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train.numpy()), train_y)
    return float(probe.score(scaler.transform(test.numpy()), test_y))


# ---- runs -----------------------------------------------------------------------------------------------


def train(variant: str, flags: str, *, root: Path, work: Path, seed: int, args) -> tuple[nn.Module, dict]:
    """Train one encoder (or build a random one) and return it with what the run reported."""
    if variant in RANDOM:
        return (ours_random_init(seed) if RANDOM[variant] == "ours" else _peer(work, root, seed, args, epochs=0)[0]), {}
    if variant == PEER:
        return _peer(work, root, seed, args, epochs=args.epochs)
    out = work / f"{variant}-{seed}"
    command = [sys.executable, "-m", "simclr_cli", "pretrain", str(root / "unlabelled"), "--arch", "resnet18",
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--seed", str(seed), "--precision", args.precision, "--out", str(out), *shlex.split(flags)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    return load_ours(out / "encoder.safetensors"), {"loss_first": losses[0], "loss_last": losses[-1]}


def _peer(work: Path, root: Path, seed: int, args, *, epochs: int) -> tuple[nn.Module, dict]:
    if not args.peer_python:
        raise SystemExit("the peer rows need --peer-python: a Python with lightly installed (see this file's docstring)")
    out = work / f"peer-{epochs}-{seed}.safetensors"
    command = [args.peer_python, str(HERE / "peer_simclr.py"), str(root / "unlabelled"), "--out", str(out),
               "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
               "--precision", args.precision, "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return load_peer(out), {"log": done.stdout.strip()}


def summary(rows: list[dict], *, order: list[str]) -> str:
    lines = ["| data | encoder | kNN top-1 | linear top-1 | seeds |", "| --- | --- | --- | --- | --- |"]
    for data in sorted({r["data"] for r in rows}):
        for variant in order:
            runs = [r for r in rows if r["data"] == data and r["variant"] == variant]
            if not runs:
                continue
            cells = []
            for key in ("knn", "linear"):
                values = [r[key] for r in runs]
                cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
            lines.append(f"| {data} | {variant} | {cells[0]} | {cells[1]} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a simclr pretrain row: its name and extra flags (default: 'defaults=' alone)")
    parser.add_argument("--no-peer", action="store_true", help="leave out the peer rows")
    parser.add_argument("--peer-only", action="store_true", help="only the peer rows (e.g. in a second process)")
    parser.add_argument("--random-init", action="store_true", help="add both untrained networks as rows")
    parser.add_argument("--peer-python", help="a Python that has lightly installed")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: a temp folder)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per (data, variant, seed); read back to resume")
    args = parser.parse_args()

    variants = dict(v.split("=", 1) for v in args.variant) or {"defaults": ""}
    randoms = [name for name, whose in RANDOM.items() if whose == "ours" or not args.no_peer] if args.random_init else []
    order = randoms + ([] if args.no_peer else [PEER]) + ([] if args.peer_only else list(variants))
    work = args.work or Path(tempfile.mkdtemp(prefix="simclr-quality-"))
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {(r["data"], r["variant"], r["seed"]) for r in rows}
    for data in args.data:
        root = work / data
        if not (root / "unlabelled").exists():
            DATASETS[data](root)
        (train_paths, train_y), (test_paths, test_y) = labelled(root, "train"), labelled(root, "test")
        for seed in args.seeds:
            for variant in order:
                if (data, variant, seed) in done:
                    continue
                started = time.perf_counter()
                net, extra = train(variant, variants.get(variant, ""), root=root, work=work / data, seed=seed, args=args)
                h_train = features(net, train_paths, size=args.image_size, precision=args.precision)
                h_test = features(net, test_paths, size=args.image_size, precision=args.precision)
                row = {"data": data, "variant": variant, "flags": variants.get(variant, ""), "seed": seed,
                       "knn": knn_top1(h_train, train_y, h_test, test_y), "linear": linear_top1(h_train, train_y, h_test, test_y),
                       "epochs": args.epochs, "batch_size": args.batch_size, "precision": args.precision,
                       "seconds": round(time.perf_counter() - started, 1), **extra}
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
                print(f"{data} {variant} seed {seed}: kNN {row['knn']:.3f} linear {row['linear']:.3f} ({row['seconds']} s)", flush=True)
    print(summary(rows, order=order))


if __name__ == "__main__":
    main()
