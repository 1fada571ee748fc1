"""nt_xent against the paper's formula (SimCLR §2.1, eq. 1) written as plain loops."""

import math

import pytest
import torch

from simclr_cli.engine.loss import nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 verbatim, one anchor at a time: the mean over all 2N anchors of
    -log(exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau))."""
    views = list(z1) + list(z2)
    n2 = len(views)

    def sim(u, v):
        return (u @ v) / (u.norm() * v.norm())

    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2  # the other view of the same image
        denominator = sum(torch.exp(sim(views[i], views[k]) / temperature) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(views[i], views[j]) / temperature) / denominator)
    return total / n2


@pytest.mark.parametrize("n,d", [(2, 3), (3, 5), (8, 4), (17, 16)])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 0.5, 1.0])
def test_matches_paper_formula_value_and_gradients(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g, requires_grad=True)
    z2 = torch.randn(n, d, generator=g, requires_grad=True)
    loss = nt_xent(z1, z2, temperature)
    loss.backward()

    r1 = z1.detach().double().requires_grad_()
    r2 = z2.detach().double().requires_grad_()
    expected = naive_nt_xent(r1, r2, temperature)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
    for got, want in ((z1.grad, r1.grad), (z2.grad, r2.grad)):
        # Relative to the gradient's scale: entries near 0 have no meaningful relative error.
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_aligned_positives_orthogonal_negatives_closed_form():
    # z_i = z_{i+N} = e_i (scaled, sim ignores length): sim is 1 with the positive, 0 with all 2N-2 negatives,
    # so l = -log(e^{1/tau} / (e^{1/tau} + 2N-2)) = log(1 + (2N-2) e^{-1/tau}) for every anchor.
    n, tau = 4, 0.5
    z1 = torch.eye(n, 6) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    z2 = torch.eye(n, 6) * 7.0
    expected = math.log(1 + 6 * math.exp(-2.0))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_identical_vectors_at_temperature_001_stay_finite():
    n = 8
    same = torch.ones(n, 4, requires_grad=True)
    loss = nt_xent(same, same, 0.01)
    loss.backward()
    # All 2N-1 candidates tie at sim 1 (logit 100): uniform over them.
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)
    assert torch.isfinite(same.grad).all()

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 32, generator=g).expand(n, 32)
    z1 = (base + 1e-4 * torch.randn(n, 32, generator=g)).requires_grad_()
    z2 = (base + 1e-4 * torch.randn(n, 32, generator=g)).requires_grad_()
    loss = nt_xent(z1, z2, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_bf16_inputs_give_the_fp32_result():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 8, generator=g).bfloat16()
    z2 = torch.randn(6, 8, generator=g).bfloat16()
    reference = nt_xent(z1.float(), z2.float(), 0.1)
    loss = nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast must not lower the precision
        torch.testing.assert_close(nt_xent(z1, z2, 0.1), reference, rtol=1e-6, atol=0)


def test_loss_is_symmetric_in_the_two_views():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), nt_xent(z2, z1, 0.2))


@pytest.mark.parametrize(
    "shape1,shape2",
    [((4, 3), (4, 5)), ((4, 3), (5, 3)), ((4,), (4,)), ((2, 4, 3), (2, 4, 3))],
)
def test_rejects_mismatched_or_non_matrix_shapes(shape1, shape2):
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(*shape1), torch.randn(*shape2), 0.1)


def test_rejects_a_single_image():
    with pytest.raises(ValueError, match="no negatives"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.1)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature)
