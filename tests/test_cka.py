"""Linear CKA against the formula written naively (HSIC with the centring matrix H), and its stated invariances."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_cli.engine import cka


def naive_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019 eq. 3 with linear kernels: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)/(n-1)^2."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n  # H = I - 11^T/n

    def hsic(k, l):
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = x @ x.T, y @ y.T  # (n, n) Gram matrices
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def random_features(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0  # an offset, so centring matters


def test_matches_the_naive_formula():
    x, y = random_features(30, 7, 0), random_features(30, 12, 1)
    y = y + 0.5 * x @ random_features(7, 12, 2)  # related, so the value is far from 0
    assert cka.linear_cka(x, y) == pytest.approx(naive_linear_cka(x, y), rel=1e-10)
    assert cka.linear_cka(y, x) == pytest.approx(cka.linear_cka(x, y), rel=1e-12)


def test_a_representation_with_itself_is_one():
    x = random_features(25, 9, 3)
    assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = random_features(40, 6, 4), random_features(40, 6, 5)
    q, _ = torch.linalg.qr(random_features(6, 6, 6))  # (6, 6) orthogonal
    base = cka.linear_cka(x, y)
    assert cka.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(x, 7.5 * y) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-12)
    # ... but not to an arbitrary invertible linear map (the point of CKA over CCA, §2.1)
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert cka.linear_cka(x @ stretch, x) < 0.99


def test_chunked_accumulation_equals_one_shot():
    x, y = random_features(103, 5, 7).float(), random_features(103, 8, 8).float()
    one_shot = cka.linear_cka(x, y, chunk_rows=1000)
    for chunk_rows in (1, 10, 64):
        assert cka.linear_cka(x, y, chunk_rows=chunk_rows) == pytest.approx(one_shot, rel=1e-12)
    assert torch.allclose(cka.centred_cross(x, y, chunk_rows=7), cka.centred_cross(x, y, chunk_rows=500), rtol=1e-12)


def test_matrix_holds_every_pair():
    a = {"one": random_features(20, 4, 9), "two": random_features(20, 3, 10)}
    b = {"p": random_features(20, 5, 11), "q": a["one"], "r": random_features(20, 2, 12)}
    m = cka.cka_matrix(a, b, chunk_rows=6)
    assert m.shape == (2, 3) and m.dtype == torch.float64
    for i, x in enumerate(a.values()):
        for j, y in enumerate(b.values()):
            assert float(m[i, j]) == pytest.approx(naive_linear_cka(x, y), rel=1e-10)
    assert float(m[0, 1]) == pytest.approx(1.0)


def test_constant_features_give_nan_and_bad_shapes_an_error():
    assert math.isnan(cka.linear_cka(torch.ones(5, 3), random_features(5, 2, 13)))
    with pytest.raises(ValueError, match="same n"):
        cka.linear_cka(torch.zeros(5, 3), torch.zeros(4, 3))
