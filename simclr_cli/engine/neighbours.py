"""Nearest-neighbour maths on feature rows: cosine top-k search in bounded memory, and weighted kNN votes
(Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", §3.4).

Features are L2-normalised, neighbours ranked by cosine similarity, and each of the k nearest training
images votes for its class with weight exp(sim / T); k = 200 and T = 0.1 are the protocol's defaults.
Similarities are computed in (query chunk x bank chunk) blocks whose top-k lists are merged, so memory
is bounded by the chunk sizes (plus Q x k for the running lists), not by N x Q. Used by `simclr knn`, retrieval
and the kNN monitor of pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_cli.engine.errors import ConfigError, DataError, is_whole_number

DEFAULT_K = 200  # Wu et al. 2018
SMALL_SET_K = 20  # for small training sets, where 200 neighbours reach across classes
SMALL_SET_SIZE = 10_000


def default_k(num_train: int) -> int:
    """200 neighbours, or 20 when the training set has fewer than 10,000 images (SIMCLR.md, kNN protocol)."""
    return SMALL_SET_K if num_train < SMALL_SET_SIZE else DEFAULT_K
DEFAULT_TEMPERATURE = 0.1  # Wu et al. 2018


@dataclass(frozen=True)
class KnnScore:
    k: int  # as asked
    k_used: int  # capped at the number of training images
    top1: float  # fraction in [0, 1]
    top5: float | None  # None with fewer than 5 classes


def scores(
    train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor, *, k: Sequence[int],
    temperature: float, num_classes: int, chunk_size: int = 1024, bank_chunk_size: int = 65536,
    device: torch.device | str | None = None,
) -> tuple[KnnScore, ...]:
    """Top-1 (and top-5 with 5 classes or more) of the weighted kNN vote for each k, in the order asked."""
    votes = knn_predict(train_features, train_labels, val_features, k=k, temperature=temperature, num_classes=num_classes,
                        chunk_size=chunk_size, bank_chunk_size=bank_chunk_size, device=device)
    return tuple(
        KnnScore(
            k=value,
            k_used=min(value, len(train_features)),
            top1=topk_accuracy(votes[value], val_labels, 1),
            top5=topk_accuracy(votes[value], val_labels, 5) if num_classes >= 5 else None,
        )
        for value in k
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
    if not ks or any(not is_whole_number(v) or v < 1 for v in ks):
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
    unit_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """Retrieval: cosine similarities (Q, k) and row indices (Q, k) of each query's k nearest index rows,
    most similar first; k is capped at the index size. `index` may be a memory-mapped .npy (read in chunks);
    `unit_rows` says its rows are L2-normalised already (`embed --normalize`), which saves computing their norms."""
    if not is_whole_number(k) or k < 1:
        raise ValueError(f"k {k!r} must be a whole number >= 1")
    if len(index) == 0:
        raise DataError("the index has no rows; embed some images first")
    if index.ndim != 2 or queries.ndim != 2 or index.shape[1] != queries.shape[1]:
        raise ConfigError(
            f"the queries have shape {tuple(queries.shape)} but the index has {tuple(index.shape)}; "
            "embed both with the same checkpoint and --layer"
        )
    return _topk_cosine(
        index, queries, k=min(k, len(index)), chunk_size=chunk_size, bank_chunk_size=bank_chunk_size, device=device,
        unit_rows=unit_rows,
    )


def _topk_cosine(
    bank: np.ndarray | Tensor,
    queries: np.ndarray | Tensor,
    *,
    k: int,
    chunk_size: int,
    bank_chunk_size: int,
    device: torch.device | str | None,
    unit_rows: bool = False,
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
        keys = _Keys(bank[b0 : b0 + bank_chunk_size], device=device, unit_rows=unit_rows)  # (Bc, D)
        for c, q0 in enumerate(range(0, num_queries, chunk_size)):
            sims = keys.cosine(q[q0 : q0 + chunk_size])  # (Qc, Bc)
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


class _Keys:
    """One chunk of bank rows, ready to be compared with normalised queries.

    Rows in a NumPy array (a memory-mapped index) searched on the CPU are multiplied where they lie, with no float
    copy and no normalised copy of the chunk: the (Q, Bc) products are divided by the row norms instead. A search
    over a million rows reads them once (twice without `unit_rows`) rather than three times.
    """

    def __init__(self, rows: np.ndarray | Tensor, *, device: torch.device, unit_rows: bool) -> None:
        self.on_cpu = isinstance(rows, np.ndarray) and device.type == "cpu"
        if self.on_cpu:
            self.rows = rows if rows.dtype == np.float32 else rows.astype(np.float32)  # (Bc, D)
            norms = None if unit_rows else np.sqrt(np.einsum("ij,ij->i", self.rows, self.rows))  # (Bc,)
            # F.normalize's floor, so a zero row scores 0, as on the other path
            self.inverse_norms = None if norms is None else torch.from_numpy(1.0 / np.maximum(norms, 1e-12))
        else:
            self.rows = F.normalize(_as_float(rows).to(device), dim=1)  # (Bc, D)

    def __len__(self) -> int:
        return len(self.rows)

    def cosine(self, queries: Tensor) -> Tensor:
        """(Qc, Bc) cosine similarities of normalised `queries` (Qc, D) to these rows."""
        if not self.on_cpu:
            return queries @ self.rows.T
        sims = torch.from_numpy(queries.numpy() @ self.rows.T)  # (Qc, Bc)
        return sims if self.inverse_norms is None else sims.mul_(self.inverse_norms)


def _as_float(rows: np.ndarray | Tensor) -> Tensor:
    if isinstance(rows, np.ndarray):
        # A copy: memory-mapped rows are read-only, and only this chunk is ever held in memory.
        return torch.from_numpy(np.array(rows, dtype=np.float32))
    return rows.to(torch.float32)
