"""The one supervised training loop, shared by linear evaluation (paper protocol) and fine-tuning.

SimCLR §4.2 / Appendix B.5-B.6: a linear classifier on h, trained either on a frozen encoder (BN statistics
frozen) or together with the whole encoder. Also the pieces both tasks need around the loop: the classifier
module, labelled-image loaders and top-k accuracy.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simclr_cli.engine import checkpoint
from simclr_cli.engine.augment import AugmentConfig, eval_resize_side, eval_transform, train_eval_transform
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import CheckpointError, DataError, NonFiniteLoss
from simclr_cli.engine.images import decoded_at_least
from simclr_cli.engine.metrics import Pace
from simclr_cli.engine.model import SimCLR
from simclr_cli.engine.optim import LARS, lr_at, scaled_lr
from simclr_cli.engine.report import NoProgress, Progress, StepStats

log = logging.getLogger("simclr")


class Backbone(nn.Module):
    """x -> h (depth 0), or h through the first `depth` projection-head blocks (SimCLRv2 §2: fine-tune from layer 1)."""

    def __init__(self, model: SimCLR, *, depth: int = 0):
        super().__init__()
        if isinstance(depth, bool) or not 0 <= depth <= len(model.head.layers):
            raise ValueError(f"depth {depth!r} must be between 0 and {len(model.head.layers)}")
        self.model = model
        self.depth = depth

    @property
    def out_dim(self) -> int:
        if self.depth == 0:
            return self.model.encoder.out_dim
        return self.model.head.out_dim if self.depth == len(self.model.head.layers) else self.model.head.in_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.model.encoder(x)  # (B, out_dim)
        return self.model.head(h, depth=self.depth) if self.depth else h  # (B, out_dim | in_dim | proj_dim)


class LinearClassifier(nn.Module):
    """logits = W ((h - mean) / std) + b, zero-initialised (SimCLR Appendix B.5); mean 0 / std 1 = raw features."""

    def __init__(self, in_dim: int, num_classes: int, *, mean: Tensor | None = None, std: Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("mean", torch.zeros(in_dim) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(in_dim) if std is None else std.detach().float().clone())

    def forward(self, h: Tensor) -> Tensor:
        return self.fc((h.float() - self.mean) / self.std)  # (B, num_classes)

# A fine-tuned (or distilled) encoder file keeps its linear head as these extra tensors (read by finetune, distill
# and export).
CLASSIFIER_WEIGHT = checkpoint.CLASSIFIER_WEIGHT
CLASSIFIER_BIAS = checkpoint.CLASSIFIER_BIAS


class Classifier(nn.Module):
    """features(x) -> linear head. With `frozen`, the features stay in eval mode and get no gradient, whatever
    `.train()` is called: the linear-evaluation protocol freezes the encoder, BN statistics included (§4.2)."""

    def __init__(self, features: nn.Module, head: LinearClassifier, *, frozen: bool):
        super().__init__()
        self.features = features
        self.head = head
        self.frozen = frozen
        if frozen:
            features.requires_grad_(False)
            features.eval()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.features.eval()  # running statistics must not move while the head trains
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                h = self.features(x)  # (B, D)
        else:
            h = self.features(x)
        return self.head(h)  # (B, C)


class Transformed(Dataset):
    """(PIL, label) items as (transform(PIL), label)."""

    def __init__(self, images: Dataset, transform: Callable) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.images[index]
        return self.transform(image), int(label)


def check_labels(labels: Sequence[int], *, num_classes: int, name: str) -> None:
    """DataError when the set is empty or a label falls outside [0, num_classes)."""
    if not labels:
        raise DataError(f"the {name} set has no images; point it at a folder with labelled images")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise DataError(
            f"the {name} set has label {bad[0]} outside 0..{num_classes - 1}; train and val must share the same classes"
        )


def train_loader(
    images: Dataset, *, transform: Callable, batch_size: int, seed: int, workers: int, rt: Runtime
) -> DataLoader:
    """Shuffled (order seeded by `seed`), whole batches only, so BN in train mode never sees a batch of one."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        Transformed(images, transform), batch_size=batch_size, shuffle=True, generator=generator, drop_last=True,
        num_workers=workers, pin_memory=rt.device.type == "cuda",
    )


def eval_loader(images: Dataset, *, transform: Callable, batch_size: int, workers: int, rt: Runtime,
                decode_side: int | None = None) -> DataLoader:
    """In order; JPEGs decoded at the smallest scale whose short side still covers `decode_side` (the resize of
    `transform`), when given."""
    return DataLoader(
        Transformed(decoded_at_least(images, decode_side), transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=rt.device.type == "cuda",
    )


def training_crops(info) -> dict[str, Any]:
    """The crop scale and flip probability of a classifier's training input on the encoder `info` describes: the
    paper's crop, and flips as often as the encoder's pretraining flipped (the paper's 0.5 when the file does not
    say). A mirrored digit is another symbol: the demo pretrains without flips, and fine-tuning on flipped digits
    cost it 3 to 4 points. Its crop scale (0.3, so that two views of a digit share enough of it) stays with
    pretraining: one supervised view needs no overlap, and the paper's 0.08 did as well or better on the demo."""
    paper = AugmentConfig()
    return {"crop_scale": tuple(paper.crop_scale), "flip_p": paper.flip_p if info.flip_p is None else info.flip_p}


def labelled_transforms(info) -> tuple[Callable, Callable]:
    """(training, evaluation) input of a classifier on the encoder `info` describes: a random resized crop + flip
    (Appendix B.5) as `training_crops` says, and the encoder's eval transform."""
    transform = dict(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation)
    return train_eval_transform(**transform, **training_crops(info)), eval_transform(**transform)


def cosine_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Per-step lr: linear warm-up then cosine to 0 (SimCLR Appendix B.5/B.6 use no warm-up)."""
    return lambda step: lr_at(step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> int:
    """How many rows have their label among the k highest scores."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(classifier: nn.Module, loader: DataLoader, *, rt: Runtime) -> tuple[float, float | None]:
    """(top-1, top-5) accuracy as fractions; top-5 is None with fewer than 5 classes (it would be trivially 1)."""
    was_training = classifier.training
    classifier.eval()
    correct1 = correct5 = seen = 0
    num_classes = None
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    try:
        for x, y in loader:
            x = x.to(rt.device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
            y = y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = classifier(x)
            logits = logits.float()  # (B, C)
            num_classes = logits.shape[1]
            correct1 += topk_correct(logits, y, 1)
            correct5 += topk_correct(logits, y, 5)
            seen += len(y)
    finally:
        classifier.train(was_training)
    if seen == 0:
        raise DataError("the validation set has no images; point it at a folder with labelled images")
    return correct1 / seen, (correct5 / seen if num_classes >= 5 else None)


def train_classifier(
    classifier: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    lr_schedule: Callable[[int], float],
    rt: Runtime,
    progress: Progress | None = None,
    evaluate_every: int | None = 1,
    log_every: int = 10,
    description: str = "train",
) -> list[dict[str, Any]]:
    """Cross-entropy training for `epochs`, lr set every step from `lr_schedule(step)`; returns one history
    entry per epoch {epoch, loss (mean over the epoch), lr (last step's), top1, top5, seconds}.

    The model must already be on rt.device. Forward passes run under rt.autocast(); the loss is computed in fp32.
    Validation runs every `evaluate_every` epochs and after the last (None: only after the last).
    """
    progress = progress or NoProgress()
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DataError("the training set is smaller than one batch; lower --batch-size or add labelled images")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total_steps = steps_per_epoch * epochs
    scaler = rt.grad_scaler()
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    bad_step = torch.full((), -1, dtype=torch.long, device=rt.device)  # first non-finite step, kept on the device
    history: list[dict[str, Any]] = []
    step = 0
    started = time.perf_counter()
    pace = Pace(start_step=0, total_steps=total_steps)
    progress.start(total_steps=total_steps, completed=0, description=description)
    try:
        for epoch in range(epochs):
            classifier.train()
            epoch_start = window_start = time.perf_counter()
            window_images = 0
            loss_sum = torch.zeros((), device=rt.device)
            lr = 0.0
            for x, y in train_loader:
                lr = lr_schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = x.to(rt.device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
                y = y.to(rt.device, non_blocking=True)
                with rt.autocast():
                    logits = classifier(x)  # (B, C)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss = loss.detach()
                loss_sum += loss
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.tensor(step + 1, device=rt.device), bad_step)
                step += 1
                pace.stepped(step)
                window_images += len(y)
                if step % log_every == 0 or step % steps_per_epoch == 0:
                    _check_finite(bad_step)
                    now = time.perf_counter()
                    progress.update(StepStats(step=step, epoch=epoch + 1, total_steps=total_steps, loss=float(loss),
                                              lr=lr, images_per_s=window_images / max(now - window_start, 1e-9),
                                              seconds_left=pace.seconds_left(step)))
                    window_start, window_images = now, 0
            _check_finite(bad_step)
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(loss_sum) / steps_per_epoch, "lr": lr,
                                     "top1": None, "top5": None}
            if val_loader is not None and ((evaluate_every and (epoch + 1) % evaluate_every == 0) or epoch == epochs - 1):
                entry["top1"], entry["top5"] = evaluate(classifier, val_loader, rt=rt)
            entry["seconds"] = round(time.perf_counter() - epoch_start, 3)
            history.append(entry)
            level = logging.DEBUG if entry["top1"] is None and val_loader is not None else logging.INFO  # the evaluated ones
            log.log(level, "%s epoch %d/%d: loss %.4f, val top-1 %s", description, epoch + 1, epochs, entry["loss"],
                    "-" if entry["top1"] is None else f"{100 * entry['top1']:.2f}%")
    finally:
        progress.stop()
    log.debug("%s: %d steps in %.1f s", description, step, time.perf_counter() - started)
    return history


def _check_finite(bad_step: Tensor) -> None:
    bad = int(bad_step.item())
    if bad >= 0:
        raise NonFiniteLoss(bad, what="the classifier's loss")


@dataclass(frozen=True)
class Finetuned:
    """What `finetune_encoder` trained: the network (a copy), its classifier and the validation history."""

    model: SimCLR
    head: LinearClassifier
    history: list[dict[str, Any]]
    batch: int
    peak_lr: float
    steps: int


def finetune_encoder(cfg, model: SimCLR, info: checkpoint.EncoderInfo, labelled: Dataset, val: Dataset, *,
                     num_classes: int, lr_scaling: str, rt: Runtime, progress: Progress | None = None,
                     evaluations: int = 30) -> Finetuned:
    """Fine-tune a copy of `model` (the caller's is untouched) and a new zero-initialised linear layer on `labelled`
    through `info`'s transforms, validating on `val` about `evaluations` times. `cfg` is a resolved
    configs.FinetuneConfig (batch, epochs, optimizer, base lr, head layer, seed); the lr is scaled to the batch by
    `lr_scaling` (linear or sqrt)."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model).to(rt.device)
    model.requires_grad_(True)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone = Backbone(model, depth=cfg.from_head_layer)
    head = LinearClassifier(backbone.out_dim, num_classes).to(rt.device)
    classifier = Classifier(backbone, head, frozen=False)
    batch = batch_size_for(cfg.batch_size, len(labelled), name="labelled train")
    peak_lr = scaled_lr(cfg.lr, batch, lr_scaling)
    trained = [*model.encoder.parameters(), *model.head.layers[: cfg.from_head_layer].parameters(), *head.parameters()]
    optimizer = classifier_optimizer(trained, name=cfg.optimizer, lr=peak_lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
    train_transform, val_transform = labelled_transforms(info)
    loader = train_loader(labelled, transform=train_transform, batch_size=batch, seed=cfg.seed, workers=cfg.workers, rt=rt)
    val_loader = eval_loader(val, transform=val_transform, batch_size=cfg.batch_size,
                             workers=cfg.workers, rt=rt, decode_side=eval_resize_side(info.image_size))
    steps = len(loader) * cfg.epochs
    log.info("fine-tuning from head layer %d: batch %d, %d epochs of %d steps = %d steps, %s, peak lr %.4g",
             cfg.from_head_layer, batch, cfg.epochs, len(loader), steps, cfg.optimizer, peak_lr)
    history = train_classifier(
        classifier, loader, val_loader, epochs=cfg.epochs, optimizer=optimizer,
        lr_schedule=cosine_schedule(peak_lr=peak_lr, total_steps=steps), rt=rt,
        evaluate_every=math.ceil(cfg.epochs / evaluations), progress=progress, log_every=cfg.log_every,
        description="finetune",
    )
    return Finetuned(model=model, head=head, history=history, batch=batch, peak_lr=peak_lr, steps=steps)


def batch_size_for(requested: int, available: int, *, name: str) -> int:
    """The requested batch, capped at the number of images; at least 2 (BN in train mode needs two samples)."""
    if available < 2:
        raise DataError(f"the {name} set has {available} image(s); training a classifier needs at least 2")
    return min(requested, available)


def classifier_optimizer(params: list[nn.Parameter], *, name: str, lr: float, momentum: float,
                         weight_decay: float) -> torch.optim.Optimizer:
    """Nesterov SGD (SimCLR v1 fine-tuning) or LARS (SimCLRv2 fine-tuning and distillation); 1-D parameters (BN,
    biases) never get weight decay."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, exclude_1d=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def load_classifier(path: Path) -> tuple[Classifier, checkpoint.EncoderInfo]:
    """The network and linear classifier of a fine-tuned (or distilled) file, in eval mode; CheckpointError naming
    `simclr finetune` as the step that makes one when the file is a plain encoder."""
    model, info = checkpoint.load_encoder(Path(path))
    if info.extra.get("task") not in checkpoint.CLASSIFIER_TASKS:
        raise CheckpointError(
            f"{path} holds no fine-tuned classifier (it is a pretrained encoder); make one with "
            "`simclr finetune` and pass its finetuned.safetensors"
        )
    weight, bias = info.extra_tensors[CLASSIFIER_WEIGHT], info.extra_tensors[CLASSIFIER_BIAS]  # checked by load_encoder
    backbone = Backbone(model, depth=int(info.extra.get("from_head_layer", 0)))
    head = LinearClassifier(weight.shape[1], weight.shape[0])
    head.fc.load_state_dict({"weight": weight, "bias": bias})
    return Classifier(backbone, head, frozen=False).eval(), info
