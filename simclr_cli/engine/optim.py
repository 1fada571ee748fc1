"""LARS (SimCLR §2.2), parameter groups, lr scaling and the warm-up + cosine schedule (§3 "Default setting", app. B.1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from simclr_cli.engine.augment import SMALL_IMAGE_MAX_SIZE
from simclr_cli.engine.errors import ConfigError

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt")
LINEAR_BASE_LR = 0.3  # x B/256 = 4.8 at batch 4096 (§3)
SQRT_BASE_LR = 0.075  # x sqrt(B) = 4.8 at batch 4096 (app. B.1)
SMALL_IMAGE_BASE_LR = 1.0  # LARS x B/256, CIFAR-10 (app. B.9 sweeps 0.5-1.5)
PAPER_WEIGHT_DECAY, PAPER_WARMUP_EPOCHS = 1e-6, 10.0  # §3 "Default setting"
# SGD at <= 64 px: momentum SGD 0.3 x B/256, weight decay 5e-4, no warm-up. LARS's trust ratio moves every weight
# tensor by trust_coefficient x lr = 0.1% of its norm per step at batch 256, where this SGD moves the convolutions by
# 0.5-37% (measured at the first step), so in a short small-image run LARS leaves the convolutions close to their
# random init; with SGD the default trained the better encoder there (BENCHMARKS.md, "Quality").
SMALL_IMAGE_SGD = {"lr": 0.3, "weight_decay": 5e-4, "warmup_epochs": 0.0}


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888), with the update rule of the
    official SimCLR `lars_optimizer.py` (google-research/simclr), applied per parameter tensor w:

        g <- g + weight_decay * w
        trust = trust_coefficient * |w| / |g|     (1.0 when |w| or |g| is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v

    With `exclude_1d` (also a param-group option), 1-D parameters (BN weights and biases, and scalars)
    get neither weight decay nor trust scaling, as in SimCLR: their norms say nothing about a layer's scale.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_1d: bool = True,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, exclude_1d=exclude_1d
        )
        _check_lars_hyper_parameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_lars_hyper_parameters(self.param_groups[-1])  # a group may override the defaults

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if not (group["exclude_1d"] and w.ndim <= 1):
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    # torch.where keeps the norms on the device: no host sync per parameter.
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, 1.0
                    )
                    g = g * trust
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(momentum).add_(g, alpha=lr)
                w.sub_(v)
        return loss


def _check_lars_hyper_parameters(group: dict) -> None:
    if not group["lr"] >= 0:
        raise ValueError(f"LARS lr must be >= 0, got {group['lr']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"LARS momentum must be in [0, 1), got {group['momentum']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"LARS weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["trust_coefficient"] > 0:
        raise ValueError(f"LARS trust_coefficient must be > 0, got {group['trust_coefficient']}")


@dataclass
class OptimConfig:
    """The optimizer and its schedule; None is "auto", filled in by `resolved`: the SimCLR v1 ImageNet recipe
    (§3 "Default setting") above 64 px, momentum SGD at <= 64 px."""

    name: str | None = None  # lars | sgd | adamw; None: sgd at <= 64 px, lars above
    lr: float | None = None  # BASE lr, scaled by lr_scaling with the global batch; None = `resolved`'s rule
    lr_scaling: str = "linear"  # linear: lr*B/256 ; sqrt: lr*sqrt(B) (app. B.1: 0.075 x sqrt(BatchSize))
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 5e-4 for SGD at <= 64 px, else 1e-6 (v1 paper; v2 and later code: 1e-4)
    warmup_epochs: float | None = None  # None: 0 for SGD at <= 64 px, else 10 (§3), then cosine decay
    trust_coefficient: float = 0.001  # LARS eta (official code)

    def validate(self) -> None:
        if self.name is not None and self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name '{self.name}' is not supported; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr {self.lr} must be a positive number; use e.g. 0.3 (linear) or 0.075 (sqrt), or unset")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(
                f"optim.lr_scaling '{self.lr_scaling}' is not supported; choose one of {', '.join(LR_SCALINGS)}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum {self.momentum} must be in [0, 1); use e.g. 0.9")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optim.weight_decay {self.weight_decay} must be >= 0; use e.g. 1e-6 or 1e-4")
        if self.warmup_epochs is not None and not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"optim.warmup_epochs {self.warmup_epochs} must be >= 0; use e.g. 10, or 0 for none")
        if not (math.isfinite(self.trust_coefficient) and self.trust_coefficient > 0):
            raise ConfigError(f"optim.trust_coefficient {self.trust_coefficient} must be > 0; use e.g. 0.001")


    def resolved(self, *, image_size: int) -> OptimConfig:
        """Copy with every unset value filled in from the image size and the optimizer.

        At <= 64 px the optimizer is momentum SGD at 0.3 x B/256, weight decay 5e-4 and no warm-up (SMALL_IMAGE_SGD);
        above it is the paper's LARS. LARS (or AdamW) at any size gets weight decay 1e-6 and 10 warm-up epochs (§3),
        and a base lr from the scaling rule, so every rule peaks at the paper's 4.8 at batch 4096 (0.3 x B/256, §3;
        0.075 x sqrt(B), app. B.1), with CIFAR's 1.0 x B/256 for LARS at <= 64 px (app. B.9)."""
        small = image_size <= SMALL_IMAGE_MAX_SIZE
        name = self.name or ("sgd" if small else "lars")
        small_sgd = small and name == "sgd"
        if self.lr is not None:
            lr = self.lr
        elif self.lr_scaling == "sqrt":
            lr = SQRT_BASE_LR
        elif small_sgd:
            lr = SMALL_IMAGE_SGD["lr"]
        else:
            lr = SMALL_IMAGE_BASE_LR if small else LINEAR_BASE_LR
        weight_decay = self.weight_decay
        if weight_decay is None:
            weight_decay = SMALL_IMAGE_SGD["weight_decay"] if small_sgd else PAPER_WEIGHT_DECAY
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = SMALL_IMAGE_SGD["warmup_epochs"] if small_sgd else PAPER_WARMUP_EPOCHS
        return replace(self, name=name, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup)


def scaled_lr(base_lr: float, global_batch_size: int, scaling: str) -> float:
    """The peak lr for the GLOBAL batch: linear base*B/256 (§3), or sqrt base*sqrt(B) (app. B.1, better for small batches)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    raise ValueError(f"lr scaling '{scaling}' is not supported; choose one of {', '.join(LR_SCALINGS)}")


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` at (already scaled) `lr`; 1-D parameters (BN, biases) get no weight decay.

    Frozen parameters (requires_grad False) are left out.
    """
    cfg.validate()
    if cfg.name is None or cfg.weight_decay is None:
        raise ValueError("build_optimizer needs a resolved OptimConfig (OptimConfig.resolved fills in its auto values)")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, exclude_1d=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_steps_for(*, warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """round(warmup_epochs * steps_per_epoch) (§3: 10 epochs), capped at 10% of total_steps so short runs reach peak."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    if not warmup_epochs >= 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    return min(round(warmup_epochs * steps_per_epoch), total_steps // 10)


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The lr of 0-based `step`: linear warm-up to peak_lr, then cosine decay reaching 0 at total_steps (§3)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} is outside the schedule [0, {total_steps}]")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps if decay_steps else 1.0
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A run's learning rate: `warmup_steps` of linear warm-up to `peak_lr`, then cosine decay to 0 at `total_steps`."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int

    @classmethod
    def fit(cls, *, peak_lr: float, steps_per_epoch: int, epochs: int, max_steps: int | None, warmup_epochs: float) -> Schedule:
        """The schedule of `epochs` epochs, cut to `max_steps` when given (the decay then ends at the shorter run)."""
        total = steps_per_epoch * epochs
        if max_steps is not None:
            total = min(total, max_steps)
        warmup = warmup_steps_for(warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch, total_steps=total)
        return cls(peak_lr=peak_lr, warmup_steps=warmup, total_steps=total, steps_per_epoch=steps_per_epoch)

    def lr(self, step: int) -> float:
        return lr_at(step, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps)
