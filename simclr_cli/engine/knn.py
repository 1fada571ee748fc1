"""Weighted k-nearest-neighbour evaluation (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", §3.4) and cosine retrieval.

Features are L2-normalised, neighbours ranked by cosine similarity, and each of the k nearest training
images votes for its class with weight exp(sim / T); k = 200 and T = 0.1 are the protocol's defaults.
Similarities are computed in (query chunk x bank chunk) blocks whose top-k lists are merged, so memory
is bounded by the chunk sizes (plus Q x k for the running lists), not by N x Q.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.features import LAYERS, Encoder, check_layer, extract, labels_of
from simclr_cli.engine.report import Progress

log = logging.getLogger("simclr")

DEFAULT_K = 200  # Wu et al. 2018
SMALL_SET_K = 20  # for small training sets, where 200 neighbours reach across classes
SMALL_SET_SIZE = 10_000


def default_k(num_train: int) -> int:
    """200 neighbours, or 20 when the training set has fewer than 10,000 images (SIMCLR.md, kNN protocol)."""
    return SMALL_SET_K if num_train < SMALL_SET_SIZE else DEFAULT_K
DEFAULT_TEMPERATURE = 0.1  # Wu et al. 2018


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
        if not ks or not all(_is_int(k) and k >= 1 for k in ks):
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
            if not _is_int(value) or value < 1:
                raise ConfigError(f"knn.{name} {value!r} must be a whole number >= 1")
        if not _is_int(self.workers) or self.workers < 0:
            raise ConfigError(f"knn.workers {self.workers!r} must be a whole number >= 0; use 0 to load in the main process")


@dataclass(frozen=True)
class KnnScore:
    k: int  # as asked
    k_used: int  # capped at the number of training images
    top1: float  # fraction in [0, 1]
    top5: float | None  # None with fewer than 5 classes


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
    num_classes = _num_classes(train, train_labels, val_labels)
    ks = tuple(cfg.k)
    for k in ks:
        if k > len(train):
            log.warning("k=%d is more than the %d training images; using k=%d", k, len(train), len(train))

    common = dict(layer=cfg.layer, batch_size=cfg.batch_size, workers=cfg.workers, rt=rt, progress=progress)
    train_features = extract(encoder, train, description="kNN: train features", **common)  # (N, D)
    val_features = extract(encoder, val, description="kNN: val features", **common)  # (Q, D)
    scores = knn_predict(
        train_features, train_labels, val_features, k=ks, temperature=cfg.temperature, num_classes=num_classes,
        chunk_size=cfg.chunk_size, bank_chunk_size=cfg.bank_chunk_size, device=rt.device,
    )
    results = tuple(
        KnnScore(
            k=k,
            k_used=min(k, len(train)),
            top1=topk_accuracy(scores[k], val_labels, 1),
            top5=topk_accuracy(scores[k], val_labels, 5) if num_classes >= 5 else None,
        )
        for k in ks
    )
    for s in results:
        log.info("kNN k=%d T=%g: top-1 %.2f%%%s", s.k_used, cfg.temperature, 100 * s.top1,
                 "" if s.top5 is None else f", top-5 {100 * s.top5:.2f}%")
    return KnnResult(
        scores=results, temperature=cfg.temperature, layer=cfg.layer, checkpoint=encoder.source,
        train_images=len(train), val_images=len(val), num_classes=num_classes, feature_dim=train_features.shape[1],
        seconds=time.perf_counter() - started,
    )


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor | Sequence[int],
    query_features: Tensor,
    *,
    k: Sequence[int],
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """Class scores (Q, C) on the CPU for each k: the sum over the k nearest training images of exp(sim / T).

    Each query's scores are scaled by exp(-max sim / T): the same ranking and accuracy as the paper's
    votes, but no float32 overflow at small T. k is capped at the number of training images.
    """
    ks = tuple(k)
    if not ks or any(not _is_int(v) or v < 1 for v in ks):
        raise ValueError(f"k {k!r} must be one or more whole numbers >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature {temperature!r} must be > 0")
    if len(train_features) == 0:
        raise ValueError("no training features to vote")
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    if labels.shape != (len(train_features),):
        raise ValueError(f"{len(labels)} labels for {len(train_features)} training features")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    kmax = min(max(ks), len(train_features))
    sims, index = _topk_cosine(
        train_features, query_features, k=kmax, chunk_size=chunk_size, bank_chunk_size=bank_chunk_size, device=device
    )  # (Q, kmax) each, most similar first
    weights = torch.exp((sims - sims[:, :1]) / temperature)  # (Q, kmax), exp(sim/T) up to a per-query factor
    votes = labels.to(index.device)[index]  # (Q, kmax) class of each neighbour
    out = {}
    for value in ks:
        used = min(value, kmax)
        scores = torch.zeros(len(sims), num_classes, dtype=torch.float32, device=sims.device)  # (Q, C)
        scores.scatter_add_(1, votes[:, :used], weights[:, :used])
        out[value] = scores.cpu()
    return out


def topk_accuracy(scores: Tensor, labels: Tensor | Sequence[int], k: int) -> float:
    """Fraction of rows whose true label is among the k highest scores."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=scores.device)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} needs at least k classes; the scores have {scores.shape[1]}")
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} rows of scores")
    if len(labels) == 0:
        raise ValueError("no rows to score")
    top = scores.topk(k, dim=1).indices  # (Q, k)
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def nearest(
    index: np.ndarray | Tensor,
    queries: np.ndarray | Tensor,
    *,
    k: int,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Retrieval: cosine similarities (Q, k) and row indices (Q, k) of each query's k nearest index rows,
    most similar first; k is capped at the index size. `index` may be a memory-mapped .npy (read in chunks)."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"k {k!r} must be a whole number >= 1")
    if len(index) == 0:
        raise DataError("the index has no rows; embed some images first")
    if index.ndim != 2 or queries.ndim != 2 or index.shape[1] != queries.shape[1]:
        raise ConfigError(
            f"the queries have shape {tuple(queries.shape)} but the index has {tuple(index.shape)}; "
            "embed both with the same checkpoint and --layer"
        )
    return _topk_cosine(
        index, queries, k=min(k, len(index)), chunk_size=chunk_size, bank_chunk_size=bank_chunk_size, device=device
    )


def _topk_cosine(
    bank: np.ndarray | Tensor,
    queries: np.ndarray | Tensor,
    *,
    k: int,
    chunk_size: int,
    bank_chunk_size: int,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    """The k most cosine-similar bank rows of every query: similarities and indices (Q, k), on `device`."""
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    device = torch.device(device) if device is not None else torch.device("cpu")
    q = F.normalize(_as_float(queries).to(device), dim=1)  # (Q, D)
    num_queries = len(q)
    # Running top-k per query chunk, merged with each bank chunk's own top-k: exact, in bounded memory.
    best: list[tuple[Tensor, Tensor] | None] = [None] * math.ceil(num_queries / chunk_size)
    # Bank chunks outermost: each is read (from a memmap) and moved to the device once.
    for b0 in range(0, len(bank), bank_chunk_size):
        keys = F.normalize(_as_float(bank[b0 : b0 + bank_chunk_size]).to(device), dim=1)  # (Bc, D)
        for c, q0 in enumerate(range(0, num_queries, chunk_size)):
            sims = q[q0 : q0 + chunk_size] @ keys.T  # (Qc, Bc)
            top = sims.topk(min(k, len(keys)), dim=1)
            values, indices = top.values, top.indices + b0  # (Qc, <=k)
            if best[c] is not None:
                values = torch.cat([best[c][0], values], dim=1)  # (Qc, <=2k)
                indices = torch.cat([best[c][1], indices], dim=1)
                keep = values.topk(min(k, values.shape[1]), dim=1).indices
                values, indices = values.gather(1, keep), indices.gather(1, keep)
            best[c] = (values, indices)
    if not best:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])  # (Q, k) each


def _as_float(rows: np.ndarray | Tensor) -> Tensor:
    if isinstance(rows, np.ndarray):
        # A copy: memory-mapped rows are read-only, and only this chunk is ever held in memory.
        return torch.from_numpy(np.array(rows, dtype=np.float32))
    return rows.to(torch.float32)


def _num_classes(train: Dataset, train_labels: Tensor, val_labels: Tensor) -> int:
    classes = getattr(train, "classes", None)
    if classes is None and hasattr(train, "dataset"):  # a Subset
        classes = getattr(train.dataset, "classes", None)
    seen = int(torch.cat([train_labels, val_labels]).max()) + 1
    return max(len(classes), seen) if classes is not None else seen


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
