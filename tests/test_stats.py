"""Tests of ``rddrs.core.stats``: Clopper-Pearson bound, PREDICT's p-value, stable probit, soft gap.

References are independent: scipy's ``binomtest`` (exact intervals and p-values), scipy's
``ndtri`` / ``log_ndtr`` and closed forms of the normal law. Nothing is compared with a value
produced by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from rddrs.core.stats import binomial_p_value, clopper_pearson_lower, probit_of_log, soft_gap

torch.set_num_threads(1)

F64 = torch.float64

CASES = [
    (0, 10),
    (1, 10),
    (5, 10),
    (9, 10),
    (10, 10),
    (0, 1),
    (1, 1),
    (37, 100),
    (100, 100),
    (0, 1000),
    (999, 1000),
    (1000, 1000),
    (97_312, 100_000),
    (100_000, 100_000),
]


# --------------------------------------------------------------------------- Clopper-Pearson
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("k, n", CASES)
def test_clopper_pearson_matches_scipy_exact_interval(k, n, alpha):
    # a one-sided 1 - alpha bound is the lower end of the two-sided 1 - 2 alpha exact interval
    want = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    got = float(clopper_pearson_lower(k, n, alpha))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_clopper_pearson_closed_forms_at_the_ends(n):
    alpha = 0.01
    assert float(clopper_pearson_lower(0, n, alpha)) == 0.0
    # k = n: P(all n successes) = p^n = alpha at the bound
    assert float(clopper_pearson_lower(n, n, alpha)) == pytest.approx(alpha ** (1 / n), rel=1e-12)


def test_clopper_pearson_is_vectorised_and_monotone():
    n, alpha = 200, 0.05
    k = np.arange(n + 1)
    lower = clopper_pearson_lower(k, n, alpha)
    assert lower.shape == (n + 1,)
    assert np.all(np.diff(lower) > 0)  # strictly increasing in k
    assert np.all((lower >= 0) & (lower < k / n + (k == 0)))  # below the point estimate (k > 0)
    # a smaller alpha (more confidence) gives a smaller bound
    assert np.all(clopper_pearson_lower(k[1:], n, 0.001) < lower[1:])


def test_clopper_pearson_has_its_coverage():
    """P(lower > p) <= alpha, computed exactly over the binomial law (no sampling)."""
    alpha = 0.05
    for n in (20, 200):
        k = np.arange(n + 1)
        lower = clopper_pearson_lower(k, n, alpha)
        for p in np.linspace(0.01, 0.99, 41):
            miss = stats.binom.pmf(k, n, p)[lower > p].sum()
            assert miss <= alpha + 1e-12


# --------------------------------------------------------------------------- p-value
@pytest.mark.parametrize("n", [1, 2, 7, 10, 100, 1001])
def test_binomial_p_value_matches_scipy(n):
    ks = np.arange(math.ceil(n / 2), n + 1)  # PREDICT passes the larger of the two counts
    got = binomial_p_value(ks, n)
    want = np.array([stats.binomtest(int(k), n, 0.5).pvalue for k in ks])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)
    assert np.all(got <= 1.0)


def test_binomial_p_value_vectorised_over_n():
    k, n = np.array([6, 60, 12]), np.array([10, 100, 12])
    want = [stats.binomtest(int(a), int(b), 0.5).pvalue for a, b in zip(k, n)]
    np.testing.assert_allclose(binomial_p_value(k, n), want, rtol=1e-10)


# --------------------------------------------------------------------------- probit_of_log
def _log_pdf(x: np.ndarray) -> np.ndarray:
    return -0.5 * x * x - 0.5 * math.log(2 * math.pi)


def test_probit_of_log_matches_ndtri_where_exp_is_representable():
    # log_p in [-700, 0): exp(log_p) is a normal float64. Near 0, 1 - exp(log_p) loses digits
    # (both in the library and in the reference), so compare there with the accurate
    # -ndtri(-expm1(l)) at a tolerance matching float64's resolution of 1 - p.
    log_p = np.concatenate([-np.logspace(-8, math.log10(700), 60), [-700.0, -0.5, -math.log(2)]])
    got = probit_of_log(torch.tensor(log_p, dtype=F64))
    assert got.dtype == F64
    np.testing.assert_allclose(got.numpy(), special.ndtri(np.exp(log_p)), rtol=1e-10, atol=1e-12)
    upper = log_p > -math.log(2)
    accurate = -special.ndtri(-np.expm1(log_p[upper]))
    np.testing.assert_allclose(got.numpy()[upper], accurate, rtol=1e-7, atol=1e-12)
    assert float(probit_of_log(torch.tensor(-math.log(2), dtype=F64))) == pytest.approx(0.0, abs=1e-15)


def test_probit_of_log_close_to_zero_is_not_nan():
    """For -1e-16 < log_p <= 0, exp(log_p) rounds to 1; the answer is large (+inf at 0), never NaN."""
    log_p = torch.tensor([-1e-300, -1e-17, 0.0], dtype=F64)
    x = probit_of_log(log_p)
    assert not torch.isnan(x).any(), x
    assert (x > 8.0).all()  # Phi^-1(1 - 1.1e-16) = 8.2: anything closer to 1 lies further right


def test_probit_of_log_accepts_float32_and_keeps_float64():
    got = probit_of_log(torch.tensor([-0.1, -3.0], dtype=torch.float32))
    assert got.dtype == F64
    want = special.ndtri(np.exp(np.array([-0.1, -3.0], dtype=np.float32).astype(np.float64)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_probit_of_log_in_the_far_tail():
    # exp(log_p) underflows (or is subnormal) in float64 below about -708
    log_p = np.array([-650.0, -699.9, -700.1, -708.5, -745.2, -800.0, -2e3, -1e4, -5e4, -1e5])
    x = probit_of_log(torch.tensor(log_p, dtype=F64)).numpy()
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(special.log_ndtr(x), log_p, rtol=1e-12)
    assert np.all(np.diff(x) < 0)  # smaller probability, further left
    # the asymptotic law: -x ~ sqrt(-2 log_p)
    assert x[-1] == pytest.approx(-math.sqrt(2e5), rel=1e-4)


def test_probit_of_log_is_continuous_across_the_switch():
    log_p = torch.tensor([-700.0 + 1e-9, -700.0 - 1e-9], dtype=F64)
    x = probit_of_log(log_p)
    assert abs(float(x[0] - x[1])) < 1e-8


def test_probit_of_log_gradient_closed_form_and_finite_difference():
    log_p = torch.tensor([-1e-6, -0.01, -0.7, -5.0, -60.0, -690.0, -750.0, -5e3, -1e5], dtype=F64, requires_grad=True)
    x = probit_of_log(log_p)
    (grad,) = torch.autograd.grad(x.sum(), log_p)
    xd = x.detach().numpy()
    # d Phi^-1(e^l) / dl = Phi(x) / phi(x) at x = Phi^-1(e^l)
    want = np.exp(special.log_ndtr(xd) - _log_pdf(xd))
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-10)
    # central differences on the value (step relative to |l|)
    lp = log_p.detach()
    h = 1e-6 * lp.abs().clamp(min=1e-3)
    fd = (probit_of_log(lp + h) - probit_of_log(lp - h)) / (2 * h)
    np.testing.assert_allclose(grad.numpy(), fd.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- soft_gap
def _log_probs_same_every_sample(probs: np.ndarray, m: int) -> torch.Tensor:
    lp = torch.tensor(np.log(probs), dtype=F64)  # (B, K)
    return lp[:, None, :].expand(-1, m, -1).contiguous()


def test_soft_gap_known_probabilities():
    probs = np.array([[0.6, 0.3, 0.1], [0.05, 0.15, 0.8], [0.5, 0.1, 0.4]])
    r, a = soft_gap(_log_probs_same_every_sample(probs, m=5))
    top = np.argsort(-probs, axis=1)
    want = special.ndtri(probs[np.arange(3), top[:, 0]]) - special.ndtri(probs[np.arange(3), top[:, 1]])
    assert a.tolist() == top[:, 0].tolist()
    np.testing.assert_allclose(r.detach().numpy(), want, rtol=1e-12, atol=1e-12)


def test_soft_gap_averages_probabilities_over_samples():
    gen = np.random.default_rng(3)
    b, m, k = 4, 7, 5
    logits = gen.normal(size=(b, m, k)) * 2
    lp = torch.log_softmax(torch.tensor(logits, dtype=F64), -1)
    g = np.exp(lp.numpy()).mean(1)  # G = mean of the probabilities
    order = np.argsort(-g, axis=1)
    want = special.ndtri(g[np.arange(b), order[:, 0]]) - special.ndtri(g[np.arange(b), order[:, 1]])
    r, a = soft_gap(lp)
    assert a.tolist() == order[:, 0].tolist()
    np.testing.assert_allclose(r.detach().numpy(), want, rtol=1e-10)


def test_soft_gap_two_class_symmetry():
    p_b = np.array([0.4, 0.1, 1e-3, 1e-12])
    probs = np.stack([1 - p_b, p_b], 1)
    r, _ = soft_gap(_log_probs_same_every_sample(probs, m=3))
    np.testing.assert_allclose(r.numpy(), -2 * special.ndtri(p_b), rtol=1e-9)


def _confident_logits(tail: list[float]) -> torch.Tensor:
    # logits z_A = 0, z_c = log(tail_c): p_c = tail_c / (1 + sum tail) (one input, one sample)
    return torch.tensor([[[0.0] + [math.log(t) for t in tail]]], dtype=F64)


def test_soft_gap_confident_input_is_finite_and_exact():
    tail = [0.7e-30, 0.3e-30]
    lp = torch.log_softmax(_confident_logits(tail), -1)
    g_a = float(lp[0, 0, 0].exp())
    assert g_a == 1.0  # 1 - 1e-30 is not a float64: a naive Phi^-1(G_A) would be +inf
    r, a = soft_gap(lp)
    total = sum(tail) / (1 + sum(tail))
    want = -special.ndtri(total) - special.ndtri(tail[0] / (1 + sum(tail)))
    assert int(a) == 0
    assert math.isfinite(float(r)) and float(r) > 20
    assert float(r) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("p_b", [0.2, 1e-6, 1e-30, 1e-200])
def test_soft_gap_gradient_with_respect_to_logits(p_b):
    """Two classes, logit difference s: G_B = sigmoid(-s), R = -2 Phi^-1(G_B).

    dR/dz_A = -dR/dz_B = 2 p_A p_B / phi(Phi^-1(p_B)). A clamp of G_A (or dropping the
    Phi^-1(G_A) term's gradient) gives zero or half of this for a confident input.
    """
    s = math.log((1 - p_b) / p_b) if p_b > 1e-20 else -math.log(p_b)
    logits = torch.tensor([[[s, 0.0]]], dtype=F64, requires_grad=True)
    r, _ = soft_gap(torch.log_softmax(logits, -1))
    (grad,) = torch.autograd.grad(r.sum(), logits)
    pb = 1.0 / (1.0 + math.exp(s))
    x_b = float(special.ndtri(pb))
    want = 2 * (1 - pb) * pb / math.exp(_log_pdf(np.array(x_b)))
    assert grad[0, 0, 0].item() == pytest.approx(want, rel=1e-8)
    assert grad[0, 0, 1].item() == pytest.approx(-want, rel=1e-8)
    assert want > 0


def test_soft_gap_gradient_matches_finite_differences_when_confident():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=gen, dtype=F64)
    logits[:, :, 2] += 40.0  # class 2 dominates: 1 - G_A ~ 1e-17, below float64's resolution of 1
    logits.requires_grad_(True)

    def f(z):
        return soft_gap(torch.log_softmax(z, -1))[0].sum()

    (grad,) = torch.autograd.grad(f(logits), logits)
    assert grad.abs().amax() > 0 and torch.isfinite(grad).all()
    # the A-term alone has non-zero gradient on the A logits
    assert grad[:, :, 2].abs().amin() > 0
    direction = torch.randn(logits.shape, generator=gen, dtype=F64)
    h = 1e-5
    with torch.no_grad():
        fd = (f(logits + h * direction) - f(logits - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(float(fd), rel=1e-6)
