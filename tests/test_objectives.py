"""The three readings of the soft certificate R (soft, clamped, capped) against closed forms,
reference formulas and finite differences."""

import math

import numpy as np
import pytest
import torch
from helpers import F64, generator, raises_one_line, scale_matrix
from scipy import special, stats

from rddrs.core import objectives
from rddrs.core.methods import METHODS
from rddrs.core.noise import Diagonal, FullSPD, Isotropic, NoiseSource
from rddrs.core.optimize import objective_and_gradient, search
from rddrs.core.presets import Search
from rddrs.core.stats import class_means, gap_cap

torch.set_num_threads(1)


class Probit(torch.nn.Module):
    """Two classes with probabilities ``Phi(t), 1 - Phi(t)``, ``t = w.y + b``: under ``y = x + S eps``
    the smoothed probability is ``G_A = Phi((w.x + b) / sqrt(1 + |S w|^2))`` exactly."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, y):
        t = y.reshape(len(y), -1) @ self.w + self.b
        return torch.stack([special_log_ndtr(t), special_log_ndtr(-t)], -1)


def special_log_ndtr(t):
    return torch.special.log_ndtr(t)


def exact_g(w, x, s, b=0.0):
    """Closed-form smoothed probability of class 0 for each input."""
    sw = torch.einsum("bij,i->bj", s, w) if s.dim() == 3 else s * w
    return torch.distributions.Normal(0.0, 1.0).cdf((x @ w + b) / torch.sqrt(1 + (sw * sw).sum(-1)))


D = 5
W = torch.tensor([1.5, -0.5, 0.8, 0.0, 0.3], dtype=F64)
MODEL = Probit(W)


def _means(model, x, law, eps):
    leaf = law.leaf()
    noisy = leaf.scale_noise(eps, offset=x.reshape(len(x), 1, -1))
    return leaf, class_means(torch.log_softmax(model(noisy.reshape(-1, D)).reshape(len(x), eps.shape[1], -1), -1))


def test_soft_means_approach_the_closed_form():
    x = torch.tensor([[0.3, 0.1, 0.0, 0.2, 0.0], [1.0, -0.5, 0.4, 0.0, 0.1]], dtype=F64)
    law = Diagonal(torch.tensor([[0.5] * D, [0.2, 0.9, 0.4, 0.3, 0.6]], dtype=F64))
    eps = NoiseSource(0, "optimize").draw([0, 1], 40_000, D, F64)
    _, means = _means(MODEL, x, law, eps)
    g = exact_g(W, x, law.param)
    torch.testing.assert_close(means.log_g[:, 0].exp(), g, atol=5e-3, rtol=0)


@pytest.mark.parametrize("method", ["ddrs", "ancer", "rddrs"])
def test_clamped_is_the_reference_formula(method):
    """Value ``Phi^-1(clamp G_A) - Phi^-1(clamp G_B)``; gradient through autograd's clamp (DDRS,
    ANCER) or ``dG / phi(Phi^-1(clamped G))`` (RDDRS), on the same draws."""
    clamp = METHODS[method].clamp
    x = torch.tensor([[0.2, 0.0, 0.1, 0.0, 0.0], [2.5, -1.0, 1.0, 0.0, 0.5]], dtype=F64)  # unsure, confident
    law = {
        "ddrs": Isotropic(torch.tensor([0.4, 0.3], dtype=F64), D),
        "ancer": Diagonal(torch.full((2, D), 0.3, dtype=F64)),
        "rddrs": FullSPD(torch.stack([scale_matrix("full", D, 1), scale_matrix("full", D, 2)]) * 0.3),
    }[method]
    eps = NoiseSource(1, "optimize").draw([0, 1], 4000, D, F64)
    leaf, means = _means(MODEL, x, law, eps)
    value = objectives.build("clamped", clamp)(means)
    (grad,) = torch.autograd.grad(value.sum(), leaf.param)
    # the reference: G from the mean of the probabilities, clamped as the authors' code does
    leaf2 = law.leaf()
    noisy = leaf2.scale_noise(eps, offset=x.reshape(2, 1, -1))
    probs = torch.softmax(MODEL(noisy.reshape(-1, D)).reshape(2, eps.shape[1], -1), -1).mean(1)
    g_a, g_b = probs.max(1).values, probs.min(1).values
    c_a, c_b = g_a.clamp(clamp.low, clamp.high), g_b.clamp(clamp.low, clamp.high)
    expected = special.ndtri(c_a.detach().numpy()) - special.ndtri(c_b.detach().numpy())
    torch.testing.assert_close(value.detach(), torch.as_tensor(expected), rtol=1e-10, atol=1e-12)
    if clamp.slope == "autograd":
        reference = torch.special.ndtri(c_a) - torch.special.ndtri(c_b)
    else:
        phi = lambda c: torch.exp(-0.5 * torch.special.ndtri(c.detach()) ** 2) / math.sqrt(2 * math.pi)
        reference = g_a / phi(c_a) - g_b / phi(c_b)
    (want,) = torch.autograd.grad(reference.sum(), leaf2.param)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    confident = 1
    assert float(g_a[confident].detach()) > clamp.high  # the clamp binds on the second input
    if clamp.slope == "autograd":
        assert float(grad[confident].abs().max()) == 0.0  # a clamped input has no gradient of R
    else:
        assert float(grad[confident].abs().max()) > 0.0  # RDDRS' hand-written gradient keeps its shape term


def test_clamped_ddrs_gives_confident_inputs_one_sigma():
    """The reference DDRS: R is constant for every input above the clamp, so they all grow alike."""
    x = torch.tensor([[2.5, -1.0, 1.0, 0.0, 0.5], [3.5, -1.0, 1.0, 0.0, 0.5]], dtype=F64)
    base = Isotropic(torch.full((2,), 0.25, dtype=F64), D)
    settings = Search(20, 256, 1e-2, scale=0.5, objective="clamped")
    found = search(MODEL, x, base, [0, 1], settings, 1e-3, seed=0, clamp=METHODS["ddrs"].clamp)
    sigma = found.smoothing.param
    assert float(sigma[0]) > 0.25 and float(sigma[0]) == pytest.approx(float(sigma[1]), rel=1e-12)
    soft = search(MODEL, x, base, [0, 1], Search(20, 256, 1e-2, scale=0.5), 1e-3, seed=0).smoothing.param
    assert abs(float(soft[0] - soft[1])) > 1e-3  # the soft reading tells them apart


def _capped_value_and_gradient(law, x, eps, cap):
    return objective_and_gradient(MODEL, x, law, eps, kappa=0.0, objective=objectives.Capped(cap))


@pytest.mark.parametrize("family", ["isotropic", "diagonal", "full"])
def test_capped_gradient_matches_finite_differences(family):
    x = torch.tensor([[1.2, -0.4, 0.5, 0.1, 0.2], [0.6, 0.2, 0.3, 0.0, 0.1]], dtype=F64)
    eps = NoiseSource(2, "optimize").draw([0, 1], 3000, D, F64)
    gen = generator(3)
    if family == "isotropic":
        law = Isotropic(torch.tensor([0.3, 0.5], dtype=F64), D)
        v = torch.randn(2, generator=gen, dtype=F64)
        move = lambda h: Isotropic(law.param + h * v, D)
    elif family == "diagonal":
        law = Diagonal(0.3 + 0.2 * torch.rand(2, D, generator=gen, dtype=F64))
        v = torch.randn(2, D, generator=gen, dtype=F64)
        move = lambda h: Diagonal(law.param + h * v)
    else:
        from rddrs.core import spd

        c = torch.stack([scale_matrix("full", D, 4), scale_matrix("full", D, 5)]) * 0.4
        law = FullSPD(c)
        v = spd.sym(torch.randn(2, D, D, generator=gen, dtype=F64))
        move = lambda h: FullSPD(spd.exp(c, h * v))
    cap = 1.3  # R / 2 is near the cap here, where the smooth minimum bends
    value, grad = _capped_value_and_gradient(law, x, eps, cap)
    h = 1e-5
    fd = (
        _capped_value_and_gradient(move(h), x, eps, cap)[0] - _capped_value_and_gradient(move(-h), x, eps, cap)[0]
    ) / (2 * h)
    torch.testing.assert_close(law.inner(grad, v), fd, rtol=1e-5, atol=1e-9)


def test_capped_limits_the_soft_gap_smoothly():
    soft = torch.linspace(0.0, 12.0, 49, dtype=F64)
    cap, tau = 3.2, objectives.CAP_TEMPERATURE

    # two classes with G_B = Phi(-R/2): the soft gap is R
    p_b = torch.special.ndtr(-soft / 2)
    log_probs = torch.stack([torch.log1p(-p_b), p_b.log()], -1)[:, None, :]
    means = class_means(log_probs)
    torch.testing.assert_close(objectives.Soft()(means), soft, rtol=1e-9, atol=1e-9)
    capped = objectives.Capped(cap)(means)
    assert (capped <= soft + 1e-12).all() and (capped < 2 * cap).all()
    assert (capped.diff() > 0).all()  # still increasing: more gap never hurts
    torch.testing.assert_close(capped[:3], soft[:3], rtol=0, atol=2 * tau * math.exp(-(cap - 0.5) / tau) + 1e-12)
    assert float(capped[-1]) == pytest.approx(2 * cap, abs=2 * tau * math.exp(-(6 - cap) / tau))


def test_cap_temperature_follows_the_expected_certificate():
    """g_cap stays within 0.08 of CERTIFY's expected gap at n = 10^4, alpha = 10^-3."""
    n, alpha = 10_000, 1e-3
    cap = gap_cap(n, alpha)
    assert cap == pytest.approx(stats.norm.ppf(alpha ** (1 / n)), rel=1e-12)
    k = np.arange(n + 1)
    lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    certified = np.where(lower > 0.5, stats.norm.ppf(np.maximum(lower, 0.5)), 0.0)
    tau = objectives.CAP_TEMPERATURE
    for g in np.linspace(1.0, 6.0, 26):
        expected = (stats.binom.pmf(k, n, stats.norm.cdf(g)) * certified).sum()
        smooth = -tau * np.logaddexp(-g / tau, -cap / tau)
        assert abs(smooth - expected) < 0.08, (g, smooth, expected)


def test_bad_objective_settings_are_one_line_errors():
    assert "capped objective" in raises_one_line(Search, 5, 8, 0.1, objective="capped")
    assert "capped objective" in raises_one_line(Search, 5, 8, 0.1, cap=3.2)
    assert "unknown objective" in raises_one_line(Search, 5, 8, 0.1, objective="hard")
    assert "unknown step rule" in raises_one_line(Search, 5, 8, 0.1, step="lbfgs")
    assert "cap" in raises_one_line(objectives.build, "capped")
    assert "clamp" in raises_one_line(objectives.build, "clamped")


def test_old_sidecar_records_read_as_the_papers_search():
    old = {
        "iterations": 50,
        "samples": 64,
        "lr": 0.08,
        "kappa": 2.0,
        "scale": 1.0,
        "adam": True,
        "keep_best_every": None,
        "max_step": None,
    }
    search_ = Search.from_dict(old)
    assert (search_.step, search_.objective) == ("adam", "soft")
    assert Search.from_dict({**old, "adam": False}).step == "sgd"
    assert "unknown search setting" in raises_one_line(Search.from_dict, {**old, "momentum": 0.9})
