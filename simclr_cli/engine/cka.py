"""Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited", §3).

For features X (n, p) and Y (n, q) of the same n examples, with every column centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

the feature-space form of HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = XX^T, L = YY^T: it never
builds an (n, n) Gram matrix, so memory grows with the feature widths, not with the number of images. Invariant to
orthogonal transforms and isotropic scaling of either representation (§2.1), 1 for a representation with itself.
Sums are taken in float64 over chunks of rows, whatever dtype the features arrive in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

CHUNK_ROWS = 4096  # rows per float64 block: a chunk of 2048-wide features is 64 MB


def centred_cross(x: Tensor, y: Tensor, *, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """(X - mean X)^T (Y - mean Y) as a float64 (p, q) tensor, accumulated over blocks of `chunk_rows` rows."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs (n, p) and (n, q) features of the same n examples; got {tuple(x.shape)} and {tuple(y.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
    mean_x, mean_y = _column_mean(x, chunk_rows), _column_mean(y, chunk_rows)  # (p,), (q,)
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)  # (p, q)
    for start in range(0, x.shape[0], chunk_rows):
        xc = x[start : start + chunk_rows].to(torch.float64) - mean_x  # (c, p)
        yc = y[start : start + chunk_rows].to(torch.float64) - mean_y  # (c, q)
        out += xc.T @ yc
    return out


def linear_cka(x: Tensor, y: Tensor, *, chunk_rows: int = CHUNK_ROWS) -> float:
    """Linear CKA of features x (n, p) and y (n, q); NaN when either has no variance (a constant representation)."""
    return _cka(centred_cross(x, y, chunk_rows=chunk_rows), _self_norm(x, chunk_rows), _self_norm(y, chunk_rows))


def cka_matrix(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """(len(a), len(b)) float64: entry [i, j] is the linear CKA of a's i-th and b's j-th features (same n rows)."""
    norms_a = [_self_norm(x, chunk_rows) for x in a.values()]
    norms_b = [_self_norm(y, chunk_rows) for y in b.values()]
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    for i, x in enumerate(a.values()):
        for j, y in enumerate(b.values()):
            out[i, j] = _cka(centred_cross(x, y, chunk_rows=chunk_rows), norms_a[i], norms_b[j])
    return out


def _column_mean(x: Tensor, chunk_rows: int) -> Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_rows):
        total += x[start : start + chunk_rows].to(torch.float64).sum(dim=0)
    return total / max(x.shape[0], 1)


def _self_norm(x: Tensor, chunk_rows: int) -> float:
    """||X^T X||_F of the centred features: the denominator's factor for x."""
    return float(torch.linalg.matrix_norm(centred_cross(x, x, chunk_rows=chunk_rows)))


def _cka(cross: Tensor, norm_x: float, norm_y: float) -> float:
    if norm_x == 0 or norm_y == 0:
        return float("nan")
    return float(cross.square().sum()) / (norm_x * norm_y)
