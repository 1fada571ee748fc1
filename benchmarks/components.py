"""Swap one part of simclr's pretraining for the common alternative and measure what it does to quality.

`quality.py` compares whole recipes through the command line; this script opens the engine's parts (model,
head, batched views, NT-Xent, optimiser, schedule) in one short training loop so that the parts no flag
reaches can be swapped one at a time:

    --model simclr | simclr-zero-init | torchvision   the encoder and its initialisation
    --head simclr | mlp-bn | mlp                      SimCLR's head (no biases, BN on z without shift), lightly's
                                                      Linear-BN-ReLU-Linear, or a plain Linear-ReLU-Linear
    --views batched | pil                             simclr's batched tensor views, or torchvision's PIL pipeline
    --bn joint | per-view                             BN statistics over all 2N views (SimCLR §2.2) or per view
    --eval-size N                                     the test-time resolution (default: the training one)

plus the optimiser, learning rate, temperature, warm-up and precision. The data and the probes are
`quality.py`'s (digits upscaled to 28 px or photo crops; kNN k=20 and L-BFGS logistic regression on h).

    python benchmarks/components.py --data digits --model simclr-zero-init --seed 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from quality import DATASETS, features, knn_top1, labelled, linear_top1, small_stem_resnet18
from simclr_cli.engine.augment import AugmentConfig, TwoViews
from simclr_cli.engine.loss import nt_xent
from simclr_cli.engine.model import ProjectionHead, ResNet
from simclr_cli.engine.optim import OptimConfig, build_optimizer, lr_at, scaled_lr, warmup_steps_for
from simclr_cli.engine.views import BatchViews


def encoder(kind: str) -> nn.Module:
    if kind == "torchvision":
        return small_stem_resnet18()
    return ResNet(arch="resnet18", stem="small", zero_init_residual=kind == "simclr-zero-init")


def head(kind: str, dim: int = 512, out: int = 128) -> nn.Module:
    if kind == "simclr":
        return ProjectionHead(in_dim=dim, out_dim=out, layers=2)
    if kind == "mlp-bn":
        return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, out))
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--model", choices=("simclr", "simclr-zero-init", "torchvision"), default="simclr")
    parser.add_argument("--head", choices=("simclr", "mlp-bn", "mlp"), default="simclr")
    parser.add_argument("--views", choices=("batched", "pil"), default="batched")
    parser.add_argument("--bn", choices=("joint", "per-view"), default="joint")
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.3, help="base lr, x B/256")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--warmup-epochs", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result as a JSON line")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="simclr-components-"))
    root = work / args.data
    if not (root / "unlabelled").exists():
        DATASETS[args.data](root)
    (train_paths, train_y), (test_paths, test_y) = labelled(root, "train"), labelled(root, "test")
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in train_paths]  # (H, W, 3) uint8 each, one size
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    pil = [Image.fromarray(p) for p in pixels]

    torch.manual_seed(args.seed)
    f, g = encoder(args.model), head(args.head)
    model = nn.Sequential(f, g)
    bf16 = args.precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    augment = AugmentConfig(image_size=args.image_size)  # size-aware: colour 0.5 and no blur at <= 64 px
    batched, reference = BatchViews(augment, seed=args.seed), TwoViews(augment)
    steps_per_epoch = len(images) // args.batch_size
    total = steps_per_epoch * args.epochs
    peak = scaled_lr(args.lr, args.batch_size, "linear")
    optimizer = build_optimizer(model, OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay), lr=peak)
    warmup = warmup_steps_for(warmup_epochs=args.warmup_epochs, steps_per_epoch=steps_per_epoch, total_steps=total)
    order = torch.Generator().manual_seed(args.seed)
    started, losses, step = time.perf_counter(), [], 0
    for epoch in range(args.epochs):
        permutation = torch.randperm(len(images), generator=order)
        for b in range(steps_per_epoch):
            idx = permutation[b * args.batch_size : (b + 1) * args.batch_size]
            if args.views == "batched":
                sizes = torch.tensor([images.shape[2:]] * len(idx))
                x = batched(images[idx], sizes, idx, epoch=epoch)  # (2N, 3, S, S): views 1, then views 2
            else:
                pairs = [reference(pil[i]) for i in idx.tolist()]
                x = torch.cat([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])])
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak_lr=peak, warmup_steps=warmup, total_steps=total)
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # joint: BN statistics over all 2N views; per-view: each view's N images normalised apart
                z = model(x) if args.bn == "joint" else torch.cat([model(v) for v in x.chunk(2)])
            z1, z2 = z.float().chunk(2)  # (N, 128) each
            loss = nt_xent(z1, z2, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1

    size = args.eval_size or args.image_size
    h_train = features(f, train_paths, size=size, precision=args.precision)
    h_test = features(f, test_paths, size=size, precision=args.precision)
    row = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "steps": total,
           "loss_first": losses[0], "loss_last": losses[-1],
           "knn": knn_top1(h_train, train_y, h_test, test_y), "linear": linear_top1(h_train, train_y, h_test, test_y),
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
