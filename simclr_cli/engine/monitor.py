"""A kNN check of the representation during pretraining, so quality is seen rising, not just the loss falling."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simclr_cli.engine import neighbours
from simclr_cli.engine.checkpoint import EncoderInfo
from simclr_cli.engine.datasets import LabelledSplits, labelled_splits
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.features import Encoder, extract, labels_of, num_classes_of
from simclr_cli.engine.model import SimCLR

log = logging.getLogger("simclr")

BATCH_SIZE = 256  # images per forward pass while extracting the monitor's features


@dataclass
class MonitorConfig:
    """A kNN check of the representation during pretraining, so quality is seen rising, not just the loss falling."""

    knn_data: str | None = None  # labelled data (a dataset name or a folder with train/ and val/); None = off
    every: int = 1  # epochs between checks (and one at the end)
    k: int | None = None  # None: 200, or 20 when the labelled train split has fewer than 10,000 images

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"monitor.every {self.every} must be >= 1 (epochs between kNN checks)")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"monitor.k {self.k} must be >= 1, or unset")


class Monitor:
    """kNN accuracy of the network being trained, on labelled data loaded once at the start."""

    def __init__(self, cfg: MonitorConfig, splits: LabelledSplits) -> None:
        self.cfg, self.splits = cfg, splits
        self.k = cfg.k or neighbours.default_k(len(splits.train))
        self.train_labels, self.val_labels = labels_of(splits.train), labels_of(splits.val)
        self.num_classes = num_classes_of(splits.train, self.train_labels, self.val_labels)

    @classmethod
    def open(cls, cfg: MonitorConfig, *, root: Path | None, download: bool) -> Monitor | None:
        """The monitor `cfg` asks for, or None; bad labelled data fails here, before the run writes anything."""
        if not cfg.knn_data:
            return None
        return cls(cfg, labelled_splits(cfg.knn_data, root=root, download=download))

    def due(self, step: int, *, steps_per_epoch: int, last: bool) -> bool:
        return last or step % (steps_per_epoch * self.cfg.every) == 0

    def check(self, network: SimCLR, info: EncoderInfo, *, rt: Runtime) -> dict[str, Any]:
        """kNN top-1/top-5 of h (the protocol's T = 0.1); leaves `network` in training mode."""
        encoder = Encoder(model=network, info=info, source=None)
        common = dict(layer="encoder", batch_size=BATCH_SIZE, workers=0, rt=rt)
        try:
            train = extract(encoder, self.splits.train, description="kNN: train features", **common)  # (N, D)
            val = extract(encoder, self.splits.val, description="kNN: val features", **common)  # (Q, D)
        finally:
            network.train()
        (score,) = neighbours.scores(train, self.train_labels, val, self.val_labels, k=(self.k,),
                                     temperature=neighbours.DEFAULT_TEMPERATURE, num_classes=self.num_classes, device=rt.device)
        log.info("epoch %d: kNN top-1 %.2f%% on %s", info.epoch, 100 * score.top1, self.splits.name)
        return {"knn_top1": score.top1, "knn_top5": score.top5, "knn_k": score.k_used}
