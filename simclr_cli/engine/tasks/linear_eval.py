"""Linear evaluation of a frozen encoder: the task behind `simclr linear-eval` (SimCLR §4.2, Appendix B.5).

Two protocols:
- `cached` (default): h is extracted once for every train and val image (no augmentation), then a linear
  layer with bias is fitted to convergence on those features by full-batch L-BFGS on cross-entropy plus a
  small L2 penalty on the weights (the bias is not penalised). Features are standardised with the train
  set's per-dimension mean and std, which makes one L2 strength and L-BFGS's fixed step scale sensible
  for any encoder; mean and std are saved with the classifier so its predictions can be reproduced.
  Cheap (one pass of the encoder) and deterministic — the standard alternative SIMCLR.md names.
  Memory: all features and the (N, C) logits of one chunk at a time on the device.
- `paper`: the SimCLR recipe: crop + flip augmentation through the frozen encoder (eval mode, BN statistics
  frozen) every step, Nesterov SGD momentum 0.9, lr 0.1 x B/256, cosine decay, no weight decay, 90 epochs
  (ImageNet-size images) or 100 (<= 64 px), via the shared `supervised.train_classifier` loop.
Either way the classifier is saved as `classifier.safetensors` (kind `linear-classifier`), and the validation
confusion matrix is returned and, when matplotlib is installed, drawn as `confusion.png`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from simclr_cli.engine import checkpoint, defaults, distributed, evaluation, features, plots
from simclr_cli.engine.augment import eval_resize_side
from simclr_cli.engine.configs import LinearEvalConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import CheckpointError, ConfigError
from simclr_cli.engine.logistic import accuracy, fit_linear, predict
from simclr_cli.engine.report import NoProgress, Progress
from simclr_cli.engine.supervised import (
    Backbone,
    Classifier,
    LinearClassifier,
    batch_size_for,
    check_labels,
    cosine_schedule,
    eval_loader,
    labelled_transforms,
    training_crops,
    train_classifier,
    train_loader,
)

log = logging.getLogger("simclr")

CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_KIND = "linear-classifier"
CONFUSION_FILE = "confusion.png"


@dataclass(frozen=True)
class LinearEvalResult:
    top1: float  # fractions in [0, 1]
    top5: float | None  # None with fewer than 5 classes
    protocol: str
    layer: str
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint: Path | None  # the encoder file; None for a random-init baseline
    classifier: Path
    confusion: list[list[int]]  # (C, C) validation counts: row = true class, column = predicted class
    confusion_plot: Path | None  # confusion.png; None without matplotlib
    train_images: int
    val_images: int
    num_classes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        out["classifier"] = str(self.classifier)
        out["confusion_plot"] = None if self.confusion_plot is None else str(self.confusion_plot)
        return out


def run(cfg: LinearEvalConfig, *, checkpoint: Path | None, out: Path | None = None,
        progress: Progress | None = None) -> evaluation.Evaluated | None:
    """Linear evaluation of the encoder in `checkpoint` on the labelled data `cfg` names; writes the classifier and
    results.json in `out` (default: beside the checkpoint). Returns what to show on the main process, None on the others."""
    return evaluation.run(cfg, checkpoint=checkpoint, out=out, command="linear-eval", progress=progress,
                          evaluate=lambda opened, out_dir, shown: evaluate(
                              opened.cfg, opened.encoder, opened.splits.train, opened.splits.val,
                              num_classes=len(opened.splits.classes), rt=opened.rt, out_dir=out_dir, progress=shown))


def evaluate(
    cfg: LinearEvalConfig,
    encoder: features.Encoder,
    train: Dataset,
    val: Dataset,
    *,
    num_classes: int,
    rt: Runtime,
    out_dir: Path,
    progress: Progress | None = None,
) -> LinearEvalResult:
    """Fit a linear classifier on the frozen `encoder`'s features of `train`, report accuracy on `val`."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    cfg = cfg.resolved(image_size=encoder.info.image_size)
    cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
    features.check_layer(encoder, cfg.layer)
    train_labels, val_labels = features.labels_of(train).tolist(), features.labels_of(val).tolist()
    check_labels(train_labels, num_classes=num_classes, name="train")
    check_labels(val_labels, num_classes=num_classes, name="validation")
    world = distributed.current_world()
    if cfg.protocol == "paper" and world.world_size > 1:
        raise ConfigError("--protocol paper trains in one process; drop --gpus (the cached protocol shares its feature extraction)")
    torch.manual_seed(cfg.seed)
    if cfg.protocol == "cached":
        head, top1, top5, history, settings, val_h = _cached(cfg, encoder, train, val, train_labels, val_labels,
                                                             num_classes=num_classes, rt=rt, progress=progress)
    else:
        head, top1, top5, history, settings = _paper(cfg, encoder, train, val, num_classes=num_classes, rt=rt,
                                                     progress=progress)
        # the val images through the eval transform and layer its top-1 used, for the per-class predictions
        val_h = features.extract(encoder, val, layer=cfg.layer, batch_size=cfg.batch_size, workers=cfg.workers, rt=rt,
                                 progress=progress, description="features (val)")  # (M, D)
    confusion = confusion_matrix(torch.tensor(val_labels), predict(head, val_h, device=rt.device),
                                 num_classes=num_classes)  # (C, C)
    classes = [str(c) for c in getattr(train, "classes", range(num_classes))]
    path = Path(out_dir) / CLASSIFIER_FILE
    distributed.on_main(world, lambda: save_classifier(path, head, layer=cfg.layer, classes=classes, protocol=cfg.protocol,
                                                       standardized=cfg.protocol == "cached", encoder=encoder.source),
                        device=rt.device)
    plot = Path(out_dir) / CONFUSION_FILE if plots.available() else None  # an optional extra, like pretrain's plots
    if plot is not None:
        distributed.on_main(world, lambda: plots.plot_confusion(confusion.numpy(), classes, out=plot), device=rt.device)
    log.info("linear eval (%s, %s): top-1 %.2f%%%s", cfg.protocol, cfg.layer, 100 * top1,
             "" if top5 is None else f", top-5 {100 * top5:.2f}%")
    return LinearEvalResult(
        top1=top1, top5=top5, protocol=cfg.protocol, layer=cfg.layer, settings=settings, history=history,
        checkpoint=encoder.source, classifier=path, confusion=confusion.tolist(), confusion_plot=plot,
        train_images=len(train), val_images=len(val),
        num_classes=num_classes, seconds=round(time.perf_counter() - started, 3),
    )


def _cached(cfg, encoder, train, val, train_labels, val_labels, *, num_classes, rt, progress):
    extract = dict(layer=cfg.layer, batch_size=cfg.batch_size, workers=cfg.workers, rt=rt, progress=progress)
    train_h = features.extract(encoder, train, description="features (train)", **extract)  # (N, D)
    val_h = features.extract(encoder, val, description="features (val)", **extract)  # (M, D)
    y = torch.tensor(train_labels)
    head, fit = fit_linear(train_h, y, num_classes=num_classes, l2=cfg.l2, max_iter=cfg.max_iter, device=rt.device,
                           progress=progress)
    top1, top5 = accuracy(head, val_h, torch.tensor(val_labels), device=rt.device)
    train_top1, _ = accuracy(head, train_h, y, device=rt.device)
    history = [{"epoch": 1, "loss": fit["loss"], "iterations": fit["iterations"], "train_top1": train_top1,
                "top1": top1, "top5": top5}]
    settings = {"protocol": "cached", "layer": cfg.layer, "optimizer": "lbfgs", "l2": cfg.l2, "max_iter": cfg.max_iter,
                "iterations": fit["iterations"], "standardized": True, "augmentation": None,
                "batch_size": cfg.batch_size, "seed": cfg.seed}
    return head, top1, top5, history, settings, val_h


def confusion_matrix(labels: Tensor, predicted: Tensor, *, num_classes: int) -> Tensor:
    """(C, C) int64 counts: entry [i, j] is how many samples of true class i were predicted as class j."""
    pairs = labels.long() * num_classes + predicted.long()  # (M,) the flat index of each (true, predicted) cell
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _paper(cfg, encoder, train, val, *, num_classes, rt, progress):
    info = encoder.info
    model = encoder.model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone = Backbone(model, depth=layer_depth(encoder, cfg.layer))
    head = LinearClassifier(backbone.out_dim, num_classes).to(rt.device)
    classifier = Classifier(backbone, head, frozen=True)  # encoder in eval mode, no gradient (Appendix B.5)
    batch = batch_size_for(cfg.batch_size, len(train), name="train")
    peak_lr = cfg.lr * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=cfg.momentum, nesterov=True, weight_decay=0.0)
    train_transform, val_transform = labelled_transforms(info)
    loader = train_loader(train, transform=train_transform, batch_size=batch, seed=cfg.seed, workers=cfg.workers, rt=rt)
    val_loader = eval_loader(val, transform=val_transform, batch_size=cfg.batch_size,
                             workers=cfg.workers, rt=rt, decode_side=eval_resize_side(info.image_size))
    schedule = cosine_schedule(peak_lr=peak_lr, total_steps=len(loader) * cfg.epochs)
    history = train_classifier(classifier, loader, val_loader, epochs=cfg.epochs, optimizer=optimizer,
                               lr_schedule=schedule, rt=rt, progress=progress, log_every=cfg.log_every,
                               description="linear-eval")
    settings = {"protocol": "paper", "layer": cfg.layer, "optimizer": "sgd-nesterov", "epochs": cfg.epochs,
                "batch_size": batch, "base_lr": cfg.lr, "peak_lr": peak_lr, "momentum": cfg.momentum,
                "weight_decay": 0.0, "schedule": "cosine", "augmentation": "crop+flip", **training_crops(info), "seed": cfg.seed}
    return head.cpu().eval(), history[-1]["top1"], history[-1]["top5"], history, settings


def layer_depth(encoder: features.Encoder, layer: str) -> int:
    """How many projection-head blocks a layer sits after (encoder 0, head1 1, head2 2, projection all),
    the same layers `features.extract` reads."""
    features.check_layer(encoder, layer)
    return {"encoder": 0, "head1": 1, "head2": 2}.get(layer, len(encoder.model.head.layers))


def save_classifier(
    path: Path, head: LinearClassifier, *, layer: str, classes: list[str], protocol: str, standardized: bool,
    encoder: Path | None,
) -> None:
    """weight (C, D), bias (C,) + metadata; feature mean/std are null when the features were used raw."""
    meta = {
        "layer": layer,
        "num_classes": head.fc.out_features,
        "in_dim": head.fc.in_features,
        "classes": classes,
        "feature_mean": head.mean.tolist() if standardized else None,
        "feature_std": head.std.tolist() if standardized else None,
        "protocol": protocol,
        "encoder": None if encoder is None else str(encoder),
    }
    checkpoint.save(path, {"weight": head.fc.weight, "bias": head.fc.bias}, kind=CLASSIFIER_KIND, meta=meta)


def load_classifier(path: Path) -> tuple[LinearClassifier, dict[str, Any]]:
    """The classifier `save_classifier` wrote, in eval mode, with its metadata."""
    loaded = checkpoint.load(path, kind=CLASSIFIER_KIND)
    try:
        weight, bias, meta = loaded.tensors["weight"], loaded.tensors["bias"], loaded.meta
        mean = None if meta["feature_mean"] is None else torch.tensor(meta["feature_mean"], dtype=torch.float32)
        std = None if meta["feature_std"] is None else torch.tensor(meta["feature_std"], dtype=torch.float32)
        head = LinearClassifier(weight.shape[1], weight.shape[0], mean=mean, std=std)
        head.fc.load_state_dict({"weight": weight, "bias": bias})
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a complete linear classifier ({exc!r}); the file is damaged") from exc
    return head.eval(), meta
