"""Semi-supervised fine-tuning: the task behind `simclr finetune` (SimCLR §4.2 / Appendix B.6, SimCLRv2 §2).

The whole encoder (plus the projection head's first block when fine-tuning from head layer 1, SimCLRv2)
and a new zero-initialised linear layer are trained on a class-balanced fraction of the labels (or the
images a label file lists), with BN in train mode, through the shared `supervised.train_classifier` loop.

Defaults (SimCLR v1, Appendix B.6): Nesterov SGD, momentum 0.9, lr 0.05 x B/256, no weight decay, cosine
decay without warm-up, 60 epochs at <= 1% labels, 30 epochs at <= 10%. With more labels we also use 30
epochs (our choice: the paper gives no number there). `optimizer="lars"` is the SimCLRv2 recipe:
LARS, lr 0.005 x sqrt(B). The paper's schedules are hundreds of steps of a batch of 4096; a small labelled set
instead gets a batch of at most a quarter of it and at least `min_steps` steps (more epochs). Images are flipped
as often as the encoder's pretraining flipped them (`supervised.training_crops`).
The result is saved as an encoder file (`finetuned.safetensors`) that `embed`, `knn` and `linear-eval`
accept; the classifier rides along as the extra tensors `classifier.weight` / `classifier.bias` and
`info.extra` records the classes, the head layer and the label subset.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from simclr_cli.engine import checkpoint, defaults, evaluation, external, features, weights
from simclr_cli.engine.labelsets import class_balanced_subset, image_paths, label_file_subset
from simclr_cli.engine.configs import LR_SCALING, FinetuneConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.report import NoProgress, Progress
from simclr_cli.engine.supervised import (
    CLASSIFIER_BIAS,
    CLASSIFIER_WEIGHT,
    Classifier,
    check_labels,
    finetune_encoder,
    load_classifier,
    training_crops,
)

log = logging.getLogger("simclr")

FINETUNED_FILE = "finetuned.safetensors"
MAX_EVALUATIONS = 30  # validations in a run (and one after the last epoch): a schedule of many short epochs is not all evaluation


@dataclass(frozen=True)
class FinetuneResult:
    top1: float  # fractions in [0, 1]
    top5: float | None  # None with fewer than 5 classes
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint: Path | None  # the encoder fine-tuned from; None for a random-init baseline
    finetuned: Path
    train_images: int  # the whole train set
    labelled_images: int  # the subset trained on
    val_images: int
    num_classes: int
    label_fraction: float  # labelled_images / train_images
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        out["finetuned"] = str(self.finetuned)
        return out


def run(cfg: FinetuneConfig, *, checkpoint: Path | None, out: Path | None = None,
        progress: Progress | None = None) -> evaluation.Evaluated | None:
    """Fine-tune the encoder in `checkpoint` on the labelled data `cfg` names (starting from `cfg.init`'s weights when
    given); writes finetuned.safetensors and results.json in `out` (default: beside the checkpoint)."""

    def finetune(opened: evaluation.Opened, out_dir: Path, shown: Progress | None) -> FinetuneResult:
        if cfg.init is not None:  # the checkpoint gives the architecture and transform, init the starting weights
            report = weights.init_encoder(opened.encoder.model, Path(cfg.init).expanduser())
            log.info("initialised from %s (%s): %d tensors", report.source, report.layout, report.loaded)
            if report.note:
                log.warning("%s", report.note)
        return evaluate(opened.cfg, opened.encoder, opened.splits.train, opened.splits.val,
                        num_classes=len(opened.splits.classes), rt=opened.rt, out_dir=out_dir, progress=shown,
                        train_root=Path(cfg.train).expanduser() if cfg.train else None)

    return evaluation.run(cfg, checkpoint=checkpoint, out=out, command="finetune", progress=progress, evaluate=finetune)


def evaluate(
    cfg: FinetuneConfig,
    encoder: features.Encoder,
    train: Dataset,
    val: Dataset,
    *,
    num_classes: int,
    rt: Runtime,
    out_dir: Path,
    progress: Progress | None = None,
    train_root: Path | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of `encoder` (the caller's model is untouched) on a label subset of `train`.

    `train_root` is the folder label-file lines are relative to; default: the common folder of the train images.
    """
    progress = progress or NoProgress()
    started = time.perf_counter()
    cfg.validate()
    head_blocks = len(encoder.model.head.layers)
    if cfg.from_head_layer > 0 and external.is_external(encoder.info):
        raise ConfigError(f"--from-head-layer {cfg.from_head_layer} needs a projection head; "
                          f"{external.name_of(encoder.info)} is a ResNet without one: use 0 (fine-tune from h)")
    if cfg.from_head_layer > head_blocks - 1:
        raise ConfigError(
            f"finetune.from_head_layer {cfg.from_head_layer} is past this encoder's hidden head layers "
            f"({head_blocks - 1}); use 0..{head_blocks - 1}"
        )
    labels = features.labels_of(train).tolist()
    check_labels(labels, num_classes=num_classes, name="train")
    check_labels(features.labels_of(val).tolist(), num_classes=num_classes, name="validation")
    if cfg.label_file is not None:
        paths = image_paths(train)
        root = Path(train_root) if train_root is not None else Path(os.path.commonpath([str(p) for p in paths]))
        subset = label_file_subset(Path(cfg.label_file), paths, root=root)
    else:
        subset = class_balanced_subset(labels, cfg.label_fraction, seed=cfg.seed)
    labelled_fraction = len(subset) / len(train)
    cfg = cfg.resolved(labelled_images=len(subset), labelled_fraction=labelled_fraction)
    cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
    labelled = Subset(train, subset)

    log.info("fine-tuning on %d of %d labelled images (%.2f%%)", len(labelled), len(train), 100 * labelled_fraction)
    run = finetune_encoder(cfg, encoder.model, encoder.info, labelled, val, num_classes=num_classes,
                           lr_scaling=LR_SCALING[cfg.optimizer], rt=rt, progress=progress, evaluations=MAX_EVALUATIONS)
    model, head, history, batch, peak_lr, info = run.model, run.head, run.history, run.batch, run.peak_lr, encoder.info
    settings = {
        "label_fraction": None if cfg.label_file is not None else cfg.label_fraction,
        "label_file": None if cfg.label_file is None else str(cfg.label_file),
        "from_head_layer": cfg.from_head_layer, "epochs": cfg.epochs, "batch_size": batch, "optimizer": cfg.optimizer,
        "nesterov": cfg.optimizer == "sgd", "base_lr": cfg.lr, "lr_scaling": LR_SCALING[cfg.optimizer], "peak_lr": peak_lr,
        "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "schedule": "cosine", "steps": run.steps,
        "min_steps": cfg.min_steps, "augmentation": "crop+flip", **training_crops(info), "seed": cfg.seed,
    }
    classes = [str(c) for c in getattr(train, "classes", range(num_classes))]
    path = Path(out_dir) / FINETUNED_FILE
    extra = {
        "task": "finetune", "num_classes": num_classes, "classes": classes, "from_head_layer": cfg.from_head_layer,
        "label_fraction": labelled_fraction, "subset_size": len(labelled), "train_images": len(train),
        "source": encoder.spec or (None if encoder.source is None else str(encoder.source)), "settings": settings,
    }
    checkpoint.save_encoder(
        path, model, info=dataclasses.replace(
            info, extra=extra, extra_tensors={CLASSIFIER_WEIGHT: head.fc.weight, CLASSIFIER_BIAS: head.fc.bias}
        ),
    )
    final = history[-1]
    return FinetuneResult(
        top1=final["top1"], top5=final["top5"], settings=settings, history=history, checkpoint=encoder.source,
        finetuned=path, train_images=len(train), labelled_images=len(labelled), val_images=len(val),
        num_classes=num_classes, label_fraction=labelled_fraction, seconds=round(time.perf_counter() - started, 3),
    )


def load_finetuned(path: Path) -> tuple[Classifier, checkpoint.EncoderInfo]:
    """The fine-tuned network and its classifier from a `finetuned.safetensors`, in eval mode."""
    return load_classifier(path)
