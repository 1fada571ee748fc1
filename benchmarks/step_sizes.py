"""How far one optimiser step moves each weight tensor: LARS (the paper's trust coefficient) against momentum SGD.

Takes one NT-Xent gradient of simclr's ResNet-18 (CIFAR stem, torchvision's init, the no-BN-on-z head) on a batch of
two views of the digits that benchmarks/quality.py pretrains on, and prints, per weight tensor, the size of the
first step relative to the tensor's norm, |step| / |w|:

- LARS: lr x trust_coefficient for every weight tensor (its trust ratio cancels |g|), and lr x |g| / |w| for the
  1-D parameters it excludes (BN and biases);
- SGD: lr x |g| / |w| for every tensor.

Momentum multiplies every later step by up to 1 / (1 - 0.9) = 10 for both, so the ratio of the two columns is what
a short run's encoder sees: at a budget of tens of steps, LARS at the paper's trust coefficient leaves the
convolutions close to their random init, and SGD does not (BENCHMARKS.md, "Quality").

    python benchmarks/step_sizes.py                       # LARS 1.0 x B/256 at eta 0.001 vs SGD 0.3 x B/256
    python benchmarks/step_sizes.py --lars-lr 1.0 --trust 0.01 --sgd-lr 0.3 --batch-size 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from quality import DATASETS  # the same digits, written the same way

from simclr_cli.engine.loss import nt_xent
from simclr_cli.engine.model import ModelConfig, build_model


def views(paths: list[Path], *, size: int) -> torch.Tensor:
    """Two random-resized crops (8-100%) of each image, 2N x 3 x size x size; colour is left out: a first-step
    gradient's size, not a training signal, is measured."""
    crop = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    images = [Image.open(p).convert("RGB") for p in paths]
    return torch.cat([torch.stack([crop(i) for i in images]) for _ in range(2)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lars-lr", type=float, default=1.0, help="LARS base lr, x B/256 (the small-image recipe)")
    parser.add_argument("--trust", type=float, default=0.001, help="LARS trust coefficient (the paper's 0.001)")
    parser.add_argument("--sgd-lr", type=float, default=0.3, help="SGD base lr, x B/256")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        DATASETS["digits"](Path(tmp))
        paths = sorted((Path(tmp) / "unlabelled").rglob("*.png"))[: args.batch_size]
        x = views(paths, size=32)
    model = build_model(ModelConfig(arch="resnet18", stem="small", zero_init_residual=False, head_output_bn=False))
    z1, z2 = model(x)[1].chunk(2)
    loss = nt_xent(z1, z2, args.temperature)
    loss.backward()
    lars_lr, sgd_lr = (lr * len(paths) / 256 for lr in (args.lars_lr, args.sgd_lr))
    print(f"first step on {len(paths)} digits (NT-Xent {loss.item():.3f}): |step| / |w| per tensor")
    print(f"{'tensor':44s} {'shape':>18s} {'LARS':>9s} {'SGD':>9s} {'SGD/LARS':>9s}")
    for name, w in model.named_parameters():
        if w.grad is None or name.endswith("bias"):
            continue
        moved = w.grad.norm().item() / w.norm().item()
        lars = lars_lr * args.trust if w.ndim > 1 else lars_lr * moved  # 1-D: excluded from the trust ratio
        sgd = sgd_lr * moved
        print(f"{name:44s} {str(tuple(w.shape)):>18s} {lars:9.2e} {sgd:9.2e} {sgd / lars:9.1f}")


if __name__ == "__main__":
    main()
