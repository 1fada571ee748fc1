"""`simclr knn`: weighted k-nearest-neighbour accuracy of an encoder's features (Wu et al. 2018, §3.4).

The maths (cosine search, votes, top-k) is `neighbours`; this task extracts the features and reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from simclr_cli.engine import defaults, evaluation, neighbours
from simclr_cli.engine.configs import KnnConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import DataError
from simclr_cli.engine.features import Encoder, check_layer, extract, labels_of, num_classes_of
from simclr_cli.engine.neighbours import KnnScore
from simclr_cli.engine.report import Progress

log = logging.getLogger("simclr")


@dataclass(frozen=True)
class KnnResult:
    scores: tuple[KnnScore, ...]  # one per k, in the order asked
    temperature: float
    layer: str
    checkpoint: Path | None  # None for a random-init baseline
    train_images: int
    val_images: int
    num_classes: int
    feature_dim: int
    seconds: float

    @property
    def top1(self) -> float:
        """The first k's top-1: the headline number."""
        return self.scores[0].top1

    @property
    def top5(self) -> float | None:
        return self.scores[0].top5

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "knn",
            "top1": self.top1,
            "top5": self.top5,
            "k": [s.k for s in self.scores],
            "k_used": [s.k_used for s in self.scores],
            "per_k": [{"k": s.k, "k_used": s.k_used, "top1": s.top1, "top5": s.top5} for s in self.scores],
            "temperature": self.temperature,
            "layer": self.layer,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "random_init": self.checkpoint is None,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "seconds": round(self.seconds, 3),
        }


def run(cfg: KnnConfig, *, checkpoint: Path | None, out: Path | None = None,
        progress: Progress | None = None) -> evaluation.Evaluated | None:
    """kNN accuracy of the encoder in `checkpoint` on the labelled data `cfg` names; writes results.json in `out`
    (default: beside the checkpoint). Returns what to show on the main process, None on the others."""
    return evaluation.run(cfg, checkpoint=checkpoint, out=out, command="knn", progress=progress,
                          evaluate=lambda opened, _, shown: evaluate(
                              opened.cfg, opened.encoder, opened.splits.train, opened.splits.val, rt=opened.rt, progress=shown))


def evaluate(
    cfg: KnnConfig, encoder: Encoder, train: Dataset, val: Dataset, *, rt: Runtime, progress: Progress | None = None
) -> KnnResult:
    """kNN top-1/top-5 on `val` with `train` as the neighbour bank; both yield (PIL, label)."""
    cfg.validate()
    cfg = replace(cfg, k=cfg.k or (neighbours.default_k(len(train)),),
                  workers=defaults.resolve_workers(cfg.workers, rt.device))
    check_layer(encoder, cfg.layer)
    started = time.perf_counter()
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"kNN needs training and validation images; got {len(train)} train and {len(val)} val")
    train_labels, val_labels = labels_of(train), labels_of(val)
    num_classes = num_classes_of(train, train_labels, val_labels)
    ks = tuple(cfg.k)
    for k in ks:
        if k > len(train):
            log.warning("k=%d is more than the %d training images; using k=%d", k, len(train), len(train))

    common = dict(layer=cfg.layer, batch_size=cfg.batch_size, workers=cfg.workers, rt=rt, progress=progress)
    train_features = extract(encoder, train, description="kNN: train features", **common)  # (N, D)
    val_features = extract(encoder, val, description="kNN: val features", **common)  # (Q, D)
    results = neighbours.scores(
        train_features, train_labels, val_features, val_labels, k=ks, temperature=cfg.temperature, num_classes=num_classes,
        chunk_size=cfg.chunk_size, bank_chunk_size=cfg.bank_chunk_size, device=rt.device,
    )
    for s in results:
        log.info("kNN k=%d T=%g: top-1 %.2f%%%s", s.k_used, cfg.temperature, 100 * s.top1,
                 "" if s.top5 is None else f", top-5 {100 * s.top5:.2f}%")
    return KnnResult(
        scores=results, temperature=cfg.temperature, layer=cfg.layer, checkpoint=encoder.source,
        train_images=len(train), val_images=len(val), num_classes=num_classes, feature_dim=train_features.shape[1],
        seconds=time.perf_counter() - started,
    )
