"""`simclr knn`: weighted k-nearest-neighbour accuracy of an encoder's features (Wu et al. 2018, §3.4).

The maths (cosine search, votes, top-k) is `neighbours`; this task extracts the features and reports.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from simclr_cli.engine import neighbours
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, DataError, is_whole_number
from simclr_cli.engine.features import LAYERS, Encoder, check_layer, extract, labels_of, num_classes_of
from simclr_cli.engine.neighbours import DEFAULT_K, DEFAULT_TEMPERATURE, KnnScore
from simclr_cli.engine.report import Progress

log = logging.getLogger("simclr")


@dataclass
class KnnConfig:
    k: tuple[int, ...] = (DEFAULT_K,)  # several values share one neighbour search; the first is the headline
    temperature: float = DEFAULT_TEMPERATURE
    layer: str = "encoder"  # which representation votes (features.LAYERS)
    batch_size: int = 256  # images per forward pass
    workers: int = 0  # DataLoader worker processes
    chunk_size: int = 1024  # queries per similarity block
    bank_chunk_size: int = 65536  # training features per similarity block

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and the fix."""
        ks = tuple(self.k) if isinstance(self.k, (tuple, list)) else ()
        if not ks or not all(is_whole_number(k) and k >= 1 for k in ks):
            raise ConfigError(f"knn.k {self.k!r} is not valid; give one or more whole numbers >= 1 (e.g. 200, or 20 for small sets)")
        if len(set(ks)) != len(ks):
            raise ConfigError(f"knn.k {self.k!r} repeats a value; list each k once")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ConfigError(f"knn.temperature {self.temperature!r} must be a number > 0; the protocol uses 0.1")
        if self.layer not in LAYERS:
            raise ConfigError(f"knn.layer {self.layer!r} is not one of {', '.join(LAYERS)}; encoder (h) is the usual choice")
        for name in ("batch_size", "chunk_size", "bank_chunk_size"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise ConfigError(f"knn.{name} {value!r} must be a whole number >= 1")
        if not is_whole_number(self.workers) or self.workers < 0:
            raise ConfigError(f"knn.workers {self.workers!r} must be a whole number >= 0; use 0 to load in the main process")


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


def run(
    cfg: KnnConfig, encoder: Encoder, train: Dataset, val: Dataset, *, rt: Runtime, progress: Progress | None = None
) -> KnnResult:
    """kNN top-1/top-5 on `val` with `train` as the neighbour bank; both yield (PIL, label)."""
    cfg.validate()
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
