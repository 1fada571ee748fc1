"""The peer recipe: SimCLR as the `lightly` library documents it, trained on a folder of images.

Run by `benchmarks/quality.py` under a separate Python environment that has `lightly` installed (it is not a
dependency of simclr). Saves the trained backbone as a safetensors state dict of a torchvision ResNet-18 whose
stem is the CIFAR one (3x3 stride-1 conv, no max-pool), which `quality.py` scores with the same probes as ours.

The recipe (lightly's SimCLR example, small-image settings): torchvision ResNet-18 (standard init), projection
head SimCLRProjectionHead(512, 512, 128), NTXentLoss(temperature 0.5), SimCLRTransform(input_size, colour
strength 0.5, no blur), SGD momentum 0.9, lr 0.3 x B/256, weight decay 5e-4, cosine decay per step, no warm-up.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from quality import small_stem_resnet18  # the same network the probes load the weights into

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class Folder(Dataset):
    def __init__(self, root: Path, transform) -> None:
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="0 saves the untrained network")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.3, help="base lr, x B/256")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    backbone = small_stem_resnet18()
    head = SimCLRProjectionHead(512, 512, 128)
    model = nn.Sequential(backbone, head)
    transform = SimCLRTransform(input_size=args.image_size, cj_strength=0.5, gaussian_blur=0.0)
    data = Folder(args.data, transform)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(args.seed))
    total = len(loader) * args.epochs
    peak = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=args.weight_decay)
    criterion = NTXentLoss(temperature=args.temperature)
    bf16 = args.precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    started, step, losses = time.perf_counter(), 0, []
    for _ in range(args.epochs):
        model.train()
        for x0, x1 in loader:
            for group in optimizer.param_groups:
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))
            x = torch.cat([x0, x1])
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                z = model(x)
            z0, z1 = z.float().chunk(2)
            loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(args.out))
    first = f"{losses[0]:.4f}" if losses else "-"
    last = f"{losses[-1]:.4f}" if losses else "-"
    print(f"peer: {step} steps in {time.perf_counter() - started:.1f} s, loss {first} -> {last}, saved {args.out}")


if __name__ == "__main__":
    main()
