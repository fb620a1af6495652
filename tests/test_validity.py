"""Tests of ``rddrs.studies.validity``: the measured rate of wrong certificates against exact truths.

Ground truth 1 (closed form): the linear classifier ``[0, w.z + b]``, whose smoothed class
probabilities are ``Phi(+-(w.x + b) / ||S^T w||)``; checked here against a dense numpy
computation, then used to predict the exact rate of wrong certificates from the binomial law
(selection with n0 draws, Clopper-Pearson bound with n draws), which the measured rate must
match. Ground truth 2: a small MLP trained on a 2-D problem, whose smoothed probabilities are
computed by quadrature on a grid (independently of any sampling) and estimated by
``smoothed_probability`` with 200x the certification draws.

Every check also shows power: a bound computed at alpha' = 0.5 but claimed at alpha is
caught (the measured interval lies above alpha).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from helpers import F64, FAMILIES, generator, raises_one_line, scale_matrix, smoothing, worst_point
from scipy import special, stats

from rddrs.core.certify import certify
from rddrs.core.noise import NoiseSource
from rddrs.studies.validity import CheckNoise, LinearClassifier, coverage, smoothed_probability, two_sided_interval

torch.set_num_threads(1)


def _linear(d: int, seed: int, dtype=F64) -> LinearClassifier:
    gen = generator(seed)
    return LinearClassifier(torch.randn(d, generator=gen, dtype=F64).to(dtype), float(torch.randn((), generator=gen)))


def _inputs_at(model: LinearClassifier, s: torch.Tensor, t, seed: int) -> torch.Tensor:
    """Inputs with ``(w.x + b) / ||S w|| = t`` (so P[class 1] = Phi(t)), from dense S."""
    w = model.w.double()
    x0 = torch.randn(len(t), len(w), generator=generator(seed), dtype=F64)
    target = torch.as_tensor(t, dtype=F64) * torch.linalg.norm(s.double() @ w)
    x = x0 + ((target - (x0 @ w + model.b)) / w.dot(w))[:, None] * w
    return x.to(model.w.dtype)


def _exact_wrong_rate(p_class1: float, n0: int, n: int, alpha: float) -> float:
    """P[a run of CERTIFY is wrong] for a two-class problem, from the binomial law.

    Selection: class 1 iff its count among n0 draws exceeds n0/2 (ties go to class 0, the
    first maximum). A run certifying c with true probability p_c is wrong iff
    ``p_lower > max(p_c, 1/2)`` (p_lower > 1/2 is needed to certify at all; a class with
    p_c < 1/2 is not the top class).
    """
    k = np.arange(1, n + 1)
    table = np.concatenate([[0.0], stats.beta.ppf(alpha, k, n - k + 1)])  # bound for count 0..n
    select1 = stats.binom.sf(n0 // 2, n0, p_class1)
    rate = 0.0
    for chosen, p_c in ((select1, p_class1), (1 - select1, 1 - p_class1)):
        rate += chosen * stats.binom.pmf(np.arange(n + 1), n, p_c)[table > max(p_c, 0.5)].sum()
    return rate


def _assert_matches_binomial(wrong: int, trials: int, expected: float) -> None:
    sd = math.sqrt(trials * expected * (1 - expected))
    assert abs(wrong - trials * expected) <= 4 * sd + 1, (wrong, trials * expected)


# --------------------------------------------------------------------------- ground truth 1
@pytest.mark.parametrize("d", [8, 784])
@pytest.mark.parametrize("family", FAMILIES)
def test_linear_classifier_closed_forms(family, d):
    s = scale_matrix(family, d, seed=1)
    model = _linear(d, seed=2)
    x = torch.randn(5, d, generator=generator(3), dtype=F64)
    sm = smoothing(family, s, 5)
    # dense numpy reference: P[class 1] = Phi((w.x + b) / ||S^T w||)
    s_np, w_np, x_np = s.numpy(), model.w.numpy(), x.numpy()
    t = (x_np @ w_np + model.b) / np.linalg.norm(s_np.T @ w_np)
    probs = model.smoothed_probabilities(x, sm)
    np.testing.assert_allclose(probs[:, 1], stats.norm.cdf(t), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model(x).argmax(1).numpy(), (t > 0).astype(int))

    r = np.linspace(0.3, 1.5, 5)
    point = worst_point(model, x, sm, torch.tensor(r)).numpy()
    delta = point - x_np
    u = np.linalg.solve(s_np, delta.T).T
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), r, rtol=1e-9)  # on the ellipsoid's border
    # it moves the score by -sign r ||S^T w||, the most any u with ||u|| <= r can (Cauchy-Schwarz)
    moved = (point @ w_np + model.b) - (x_np @ w_np + model.b)
    np.testing.assert_allclose(moved, -np.sign(t) * r * np.linalg.norm(s_np.T @ w_np), rtol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothed_probability_brackets_the_exact_value(family):
    d = 6
    s, model = scale_matrix(family, d, seed=4), _linear(d, seed=5)
    x = _inputs_at(model, s, [-1.0, 0.0, 0.4, 2.0], seed=6)
    sm = smoothing(family, s, len(x))
    exact = model.smoothed_probabilities(x, sm)
    est = smoothed_probability(model, x, sm, samples=40_000, seed=7, alpha=0.001)
    assert est.p.shape == (4, 2) and est.samples == 40_000
    np.testing.assert_array_equal(est.count.sum(1), 40_000)
    assert ((est.low <= exact) & (exact <= est.high)).all()
    # the interval has the width of a binomial one: +- ~3.3 sd (not vacuous)
    sd = np.sqrt(exact * (1 - exact) / 40_000)
    assert (est.high - est.low <= 8 * sd + 1e-3).all()
    # one class per input: the same draws give the same column
    one = smoothed_probability(model, x, sm, cls=[1, 0, 1, 1], samples=40_000, seed=7, alpha=0.001)
    np.testing.assert_array_equal(one.count, est.count[np.arange(4), [1, 0, 1, 1]])


def test_two_sided_interval_is_exact():
    """Clopper-Pearson: P[p in interval] >= 1 - alpha for every p (checked by the binomial law)
    and the interval is the usual Beta-quantile one."""
    n, alpha = 30, 0.05
    k = np.arange(n + 1)
    low, high = two_sided_interval(k, n, alpha)
    np.testing.assert_allclose(low[1:], stats.beta.ppf(alpha / 2, k[1:], n - k[1:] + 1), rtol=1e-12)
    np.testing.assert_allclose(high[:-1], stats.beta.ppf(1 - alpha / 2, k[:-1] + 1, n - k[:-1]), rtol=1e-12)
    assert low[0] == 0 and high[-1] == 1
    for p in np.linspace(0.01, 0.99, 37):
        covered = stats.binom.pmf(k, n, p)[(low <= p) & (p <= high)].sum()
        assert covered >= 1 - alpha - 1e-12


def test_check_streams_are_independent_of_the_method_streams():
    """Same seed and index, different stages: different draws, uncorrelated."""
    draws = {
        stage: source(3, stage).draw([5], 4000, 3, F64)[0].flatten()
        for source, stage in (
            (NoiseSource, "select"),
            (NoiseSource, "estimate"),
            (NoiseSource, "optimize"),
            (CheckNoise, "validate"),
            (CheckNoise, "attack"),
        )
    }
    names = list(draws)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            corr = float(torch.corrcoef(torch.stack([draws[a], draws[b]]))[0, 1])
            assert abs(corr) < 4 / math.sqrt(12_000), (a, b, corr)
    # the method's stages are unchanged in the subclass
    np.testing.assert_array_equal(
        CheckNoise(3, "estimate").draw([5], 10, 3, F64), NoiseSource(3, "estimate").draw([5], 10, 3, F64)
    )


def test_smoothed_probability_sees_other_noise_than_certify():
    """Same seed and indices: the noisy inputs of the estimate share no row with CERTIFY's."""
    d = 3
    s, model = scale_matrix("full", d, seed=8), _linear(d, seed=9)
    seen = []

    def recording(z):
        seen.append(z)
        return model(z)

    x = torch.zeros(2, d, dtype=F64)
    sm = smoothing("full", s, 2)
    certify(recording, x, sm, [0, 1], 10, 200, 0.1, seed=5)
    method = torch.cat(seen)
    seen.clear()
    smoothed_probability(recording, x, sm, samples=200, seed=5)
    check = torch.cat(seen)
    assert len(method) == 2 * 210 and len(check) == 2 * 200
    assert torch.cdist(check, method).min() > 1e-6


# --------------------------------------------------------------------------- coverage, linear
N0, N, ALPHA = 20, 100, 0.1


def _linear_case(family: str, d: int):
    """Two inputs with P[top] = 0.8 (class 1) and 0.85 (class 0), their laws and exact p."""
    dtype = torch.float32 if d == 784 else F64
    s = scale_matrix(family, d, seed=10 + d, dtype=dtype)
    model = _linear(d, seed=11, dtype=dtype)
    x = _inputs_at(model, s, special.ndtri([0.8, 0.15]), seed=12)
    sm = smoothing(family, s, 2)
    p_true = model.smoothed_probabilities(x, sm)
    np.testing.assert_allclose(p_true[:, 1], [0.8, 0.15], rtol=1e-4)
    return model, x, sm, p_true


@pytest.mark.parametrize("d", [6, 784])
@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_matches_the_binomial_law(family, d):
    trials = 300 if d < 784 else 120  # at d = 784 each replica's streams cost 2 x 1024 x 784 draws
    model, x, sm, p_true = _linear_case(family, d)
    result = coverage(model, x, sm, p_true, trials, N0, N, ALPHA, seed=13)
    assert result.trials == 2 * trials
    assert result.certified >= trials  # most runs certify: the count below is not vacuous
    assert result.rate == result.wrong / result.trials
    assert result.low <= result.rate <= result.high
    expected = np.mean([_exact_wrong_rate(p, N0, N, ALPHA) for p in p_true[:, 1]])
    assert 0.02 < expected <= ALPHA  # Clopper-Pearson is valid, and errors do occur here
    _assert_matches_binomial(result.wrong, result.trials, expected)
    assert result.low <= ALPHA


@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_detects_a_broken_bound(family):
    """A bound built at alpha' = 0.5 but claimed at alpha: the measured rate is clearly above alpha."""
    model, x, sm, p_true = _linear_case(family, 6)
    broken = coverage(model, x, sm, p_true, 300, N0, N, 0.5, seed=13)
    expected = np.mean([_exact_wrong_rate(p, N0, N, 0.5) for p in p_true[:, 1]])
    _assert_matches_binomial(broken.wrong, broken.trials, expected)
    assert broken.low > ALPHA


def test_a_wrong_class_counts_as_wrong():
    """p_true that names the other class as top makes every certificate wrong."""
    d = 4
    s, model = scale_matrix("diagonal", d, seed=14), _linear(d, seed=15)
    x = _inputs_at(model, s, [3.0], seed=16)  # P[class 1] = 0.9987: always certified as 1
    sm = smoothing("diagonal", s, 1)
    swapped = model.smoothed_probabilities(x, sm)[:, ::-1]
    result = coverage(model, x, sm, swapped, 50, 10, 100, 0.05, seed=0)
    assert result.certified == 50 and result.wrong == 50 and result.rate == 1.0


# --------------------------------------------------------------------------- ground truth 2
@functools.cache
def _trained_mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-32-3 MLP fitted (full batch, a few hundred Adam steps) to three Gaussian blobs."""
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [2.0, 0.5], [0.8, 2.0]])
    labels = torch.arange(3).repeat_interleave(200)
    points = centers[labels] + 0.6 * torch.randn(600, 2, generator=generator(20))
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(points), labels).backward()
        opt.step()
    model.requires_grad_(False)
    assert (model(points).argmax(1) == labels).float().mean() > 0.85
    return model, centers


def _quadrature(model, x: torch.Tensor, s: torch.Tensor, half: float = 6.0, m: int = 1201) -> np.ndarray:
    """``P[f(x + S u) = c]``, u ~ N(0, I_2), by the midpoint rule on [-6, 6]^2 (per class)."""
    grid = torch.linspace(-half, half, m, dtype=F64)
    u = torch.cartesian_prod(grid, grid)
    weight = torch.exp(-0.5 * (u * u).sum(1)) * (grid[1] - grid[0]) ** 2 / (2 * math.pi)
    probs = []
    for xi, si in zip(x, s):
        classes = model((xi.double() + u @ si.T).float()).argmax(1)
        probs.append(torch.zeros(3, dtype=F64).index_add_(0, classes, weight))
    return torch.stack(probs).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_on_a_trained_network(family):
    n0, n, alpha, trials = 20, 100, 0.1, 300
    model, centers = _trained_mlp()
    s = scale_matrix(family, 2, seed=21).float() * 0.6
    x = 0.8 * centers + 0.2 * centers.roll(-1, 0)  # each a fifth of the way to the next blob
    sm = smoothing(family, s, 3)
    est = smoothed_probability(model, x, sm, samples=200 * n, seed=22)  # 200x the certification draws
    exact = _quadrature(model, x, sm.matrix().double())
    np.testing.assert_allclose(exact.sum(1), 1.0, atol=1e-6)
    assert ((est.low <= exact + 1e-4) & (exact - 1e-4 <= est.high)).all()
    top = exact.max(1)
    assert (top > 0.6).all() and (top < 0.9).all()  # certifiable, and errors can occur

    result = coverage(model, x, sm, est.p, trials, n0, n, alpha, seed=23)
    assert result.low <= alpha
    # The exact rate lies between two binomial-law values: the top class is selected with
    # probability >= P[its count > n0/2] (a wrongly selected class, p < 1/2, is never wrongly
    # certified here), and p_top is only known within the estimate's interval.
    k = np.arange(n + 1)
    table = np.concatenate([[0.0], stats.beta.ppf(alpha, k[1:], n - k[1:] + 1)])
    rows, tops = np.arange(3), est.p.argmax(1)
    selected = stats.binom.sf(n0 // 2, n0, est.low[rows, tops])
    bound = [[stats.binom.pmf(k, n, p)[table > p].sum() for p in ends[rows, tops]] for ends in (est.low, est.high)]
    lowest, highest = np.mean(np.min(bound, 0) * selected), np.mean(np.max(bound, 0))
    assert 0.02 < highest <= alpha
    sd = math.sqrt(result.trials * highest)
    assert result.trials * lowest - 4 * sd - 1 <= result.wrong <= result.trials * highest + 4 * sd + 1

    broken = coverage(model, x, sm, est.p, trials, n0, n, 0.5, seed=23)
    assert broken.low > alpha


# --------------------------------------------------------------------------- bad input
def _good():
    d = 3
    s, model = scale_matrix("diagonal", d, seed=30), _linear(d, seed=31)
    x = torch.randn(2, d, generator=generator(32), dtype=F64)
    sm = smoothing("diagonal", s, 2)
    return model, x, sm, model.smoothed_probabilities(x, sm)


def test_bad_inputs():
    model, x, sm, p = _good()
    assert "p_true" in raises_one_line(coverage, model, x, sm, p[0], 10, 10, 50, 0.1, seed=0)
    assert "p_true" in raises_one_line(coverage, model, x, sm, p[:1], 10, 10, 50, 0.1, seed=0)
    assert "trials" in raises_one_line(coverage, model, x, sm, p, 0, 10, 50, 0.1, seed=0)
    assert "alpha" in raises_one_line(coverage, model, x, sm, p, 5, 10, 50, 1.5, seed=0)
    sure = _inputs_at(model, torch.diag(sm.param[0]), [3.0, 3.0], seed=33)  # always certified as class 1
    assert "classes" in raises_one_line(coverage, model, sure, sm, p[:, :1], 5, 10, 50, 0.1, seed=0)
    assert "samples" in raises_one_line(smoothed_probability, model, x, sm, samples=0)
    assert "alpha" in raises_one_line(smoothed_probability, model, x, sm, samples=10, alpha=0.0)
    assert "cls" in raises_one_line(smoothed_probability, model, x, sm, cls=[0], samples=10)
    assert "cls" in raises_one_line(smoothed_probability, model, x, sm, cls=[0, 2], samples=10)
    assert "cls" in raises_one_line(smoothed_probability, model, x, sm, cls=[0.5, 1.0], samples=10)
    raises_one_line(smoothed_probability, model, x[:1], sm, samples=10)  # one input, two laws
    raises_one_line(LinearClassifier, torch.ones(2, 2), 0.0)
