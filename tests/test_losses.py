"""Loss functions against hand-computed values, invariances, edge cases and finite differences."""

import math

import pytest
import torch

from flexkd import losses

S = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 1.0], [4.0, 0.0], [6.0, 1.0], [8.0, 0.0]], dtype=torch.float64)


def test_cross_correlation_hand_computed():
    # Column 0 of T is 2 x column 0 of S (corr 1); column 1 is its complement (corr -1).
    # Off-diagonals: +-(2/4)/sqrt(1.25) = +-0.4472.
    c = losses.cross_correlation(S, T)
    off = 0.5 / math.sqrt(1.25)
    expected = torch.tensor([[1.0, -off], [off, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(c, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction,scale", [("sum", 1.0), ("mean", 0.5)])
def test_correlation_loss_hand_computed(reduction, scale):
    # on-diagonal (1-1)^2 + (1-(-1))^2 = 4; off-diagonal 2 * 0.2 = 0.4, times lambda.
    lam = 5e-3
    value = losses.correlation_loss(S, T, lam=lam, reduction=reduction)
    assert value.item() == pytest.approx(scale * (4.0 + 0.4 * lam), abs=1e-4)
    assert losses.correlation_loss(S, T, lam=0.0, reduction="sum").item() == pytest.approx(4.0, abs=1e-4)


def test_correlation_loss_invariant_to_per_dimension_affine_maps():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(50, 6, generator=gen, dtype=torch.float64) + 0.5 * s
    scale = torch.rand(6, generator=gen, dtype=torch.float64) * 10 + 0.1
    shift = torch.randn(6, generator=gen, dtype=torch.float64) * 100
    base = losses.correlation_loss(s, t)
    assert losses.correlation_loss(s * scale + shift, t).item() == pytest.approx(base.item(), rel=1e-6)
    assert losses.correlation_loss(s, t * scale - shift).item() == pytest.approx(base.item(), rel=1e-6)
    # Reproducing the teacher dims up to such maps zeroes the diagonal term.
    diag_only = losses.correlation_loss(t * scale + shift, t, lam=0.0)
    assert diag_only.item() == pytest.approx(0.0, abs=1e-6)


def test_correlation_loss_no_nan_for_constant_dims_and_single_token():
    s = torch.ones(5, 3, requires_grad=True)
    t = torch.randn(5, 3)
    loss = losses.correlation_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(1.0)  # C = 0 -> (1 - 0)^2 per dim, mean over k
    one = torch.randn(1, 4, requires_grad=True)
    loss1 = losses.correlation_loss(one, torch.randn(1, 4))
    loss1.backward()
    assert torch.isfinite(loss1) and torch.isfinite(one.grad).all()


def test_correlation_loss_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: losses.correlation_loss(a, b, lam=0.3), (s, t))


def test_cka_range_identity_and_invariances():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    assert losses.cka_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    value = losses.linear_cka(x, y).item()
    assert 0.0 <= value <= 1.0
    # Invariant to isotropic scaling and orthogonal transforms; a linear map of x stays high.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    assert losses.linear_cka(3.0 * x @ q, y).item() == pytest.approx(value, rel=1e-6)
    assert losses.linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-6)


def test_cka_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.cka_loss, (x, y))


def test_masked_tokens_ignore_padding_in_every_loss():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 3, generator=gen)
    t = torch.randn(2, 5, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e6  # garbage in padding
    t2[~mask] = -1e6
    for fn in (losses.correlation_loss, losses.mse, losses.cosine_loss, losses.cka_loss):
        a = fn(losses.masked_tokens(s, mask), losses.masked_tokens(t, mask))
        b = fn(losses.masked_tokens(s2, mask), losses.masked_tokens(t2, mask))
        assert a.item() == pytest.approx(b.item(), rel=1e-6), fn.__name__


def test_logit_divergences_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_teacher = (0.75, 0.25) at T = 1
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.logit_divergence(s, t, 1.0, "forward").item() == pytest.approx(kl, rel=1e-5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert losses.logit_divergence(s, t, 1.0, "reverse").item() == pytest.approx(rkl, rel=1e-5)
    m = (0.625, 0.375)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    assert losses.logit_divergence(s, t, 1.0, "jsd").item() == pytest.approx(jsd, rel=1e-5)
    # T^2 scaling: at T = 2 the teacher is (sqrt3, 1)/(sqrt3 + 1), the student uniform.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert losses.logit_divergence(s, t, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)


def test_logit_divergence_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="same label space / vocabulary"):
        losses.logit_divergence(torch.zeros(2, 5), torch.zeros(2, 6))
