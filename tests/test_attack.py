"""Tests of ``rddrs.studies.attack`` against the closed form of a linear classifier, and on a small network.

For the linear classifier ``[0, w.z + b]`` with class c = sign(w.x + b), the smoothed loss
``-log E[sigmoid(+-(w.z + b))]`` at ``z = x + S u`` only depends on ``sign * w.(S u)``, so its
maximiser over ``||u|| <= r`` is ``u = -sign r S^T w / ||S^T w||``: the point
``x - sign r S S^T w / ||S^T w||`` (``worst_point`` in the tests' helpers, whose closed form is
checked against dense algebra in test_validity). There, the smoothed probability of c is
exactly ``Phi(|t| - r)`` with ``t = (w.x + b) / ||S^T w||``: above 1/2 inside a correct
certified region (gap < |t|), below it beyond the exact region.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, FAMILIES, generator, raises_one_line, scale_matrix, smoothing, worst_point
from scipy import stats

from rddrs.core.certify import ABSTAIN, certify
from rddrs.studies.attack import attack, check_region, smoothed_loss
from rddrs.studies.validity import LinearClassifier

torch.set_num_threads(1)


def _linear_case(family: str, d: int, t, dtype=F64, seed: int = 0):
    """Linear classifier, inputs with ``(w.x + b) / ||S w|| = t``, their laws, classes and S."""
    gen = generator(seed)
    s = scale_matrix(family, d, seed + 1, dtype)
    w = torch.randn(d, generator=gen, dtype=F64)
    model = LinearClassifier(w.to(dtype), float(torch.randn((), generator=gen)))
    t = torch.as_tensor(t, dtype=F64)
    x0 = torch.randn(len(t), d, generator=gen, dtype=F64)
    target = t * torch.linalg.norm(s.double() @ w)
    x = (x0 + ((target - (x0 @ w + model.b)) / w.dot(w))[:, None] * w).to(dtype)
    return model, x, smoothing(family, s, len(t)), (t > 0).long(), s


def _whitened_norm(s: torch.Tensor, delta: torch.Tensor) -> np.ndarray:
    """``||S^-1 delta||`` per row, by a dense solve."""
    return np.linalg.norm(np.linalg.solve(s.double().numpy(), delta.flatten(1).double().numpy().T), axis=0)


# --------------------------------------------------------------------------- linear: optimum
@pytest.mark.parametrize("d", [8, 784])
@pytest.mark.parametrize("family", FAMILIES)
def test_attack_reaches_the_closed_form_optimum(family, d):
    dtype = F64 if d < 784 else torch.float32
    t = [1.0, 2.0, -1.5, -2.5]
    model, x, sm, cls, s = _linear_case(family, d, t, dtype)
    r = torch.tensor([0.3, 0.8, 1.2, 3.0], dtype=dtype)  # the last one reaches past the boundary
    points = attack(model, x, sm, cls, r, steps=20, samples=32, seed=1)
    assert points.shape == x.shape and points.dtype == x.dtype
    best = worst_point(model, x, sm, r)
    cosine = torch.nn.functional.cosine_similarity((points - x).double(), (best - x).double(), dim=1)
    assert (cosine > 0.99).all()
    # objective sign * (w.z + b): the closed form optimum moves it by -r ||S^T w||
    sign = 2.0 * cls.double() - 1
    reach = r.double() * torch.linalg.norm(s.double() @ model.w.double())
    objective = sign * model.score(points).double()
    optimum = sign * model.score(x).double() - reach
    assert (objective - optimum).abs().max() <= 1e-3 * reach.max()
    np.testing.assert_allclose(_whitened_norm(s, points - x), r.numpy(), rtol=1e-4)  # on the border


# --------------------------------------------------------------------------- linear: soundness
@pytest.mark.parametrize("family", FAMILIES)
def test_no_flip_inside_certified_regions(family):
    d, batch = 8, 12
    t = np.linspace(0.6, 2.8, batch) * np.where(np.arange(batch) % 2, 1, -1)
    model, x, sm, cls, _ = _linear_case(family, d, t, seed=10)
    cert = certify(model, x, sm, list(range(batch)), 50, 2000, 0.001, seed=11)
    ok = cert.predict != ABSTAIN
    assert ok.sum() >= batch - 2 and (cert.predict[ok] == cls.numpy()[ok]).all()
    sub = torch.from_numpy(np.flatnonzero(ok))
    gap = torch.tensor(cert.gap[ok])
    check = check_region(
        model, x[sub], sm[sub], cls[sub], gap, steps=20, samples=64, check_samples=10_000, alpha=0.001, seed=12
    )
    assert not check.refuted.any()
    assert (check.winner == cls[sub].numpy()).all()
    # the attack found the worst point: the exact smoothed probability there is Phi(|t| - gap)
    exact = model.smoothed_probabilities(check.points, sm[sub])[np.arange(len(sub)), cls[sub].numpy()]
    np.testing.assert_allclose(exact, stats.norm.cdf(np.abs(t[ok]) - cert.gap[ok]), atol=1e-6)
    assert (exact > 0.5).all()  # certificates are correct (each fails with probability <= 0.001)
    assert (check.high >= exact).all()
    sd = np.sqrt(exact * (1 - exact) / 10_000)
    assert (np.abs(check.p - exact) <= 4 * sd).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_flip_found_beyond_the_exact_region(family):
    """With r = |t| + 1 the worst point has P[c] = Phi(-1) = 0.16: the check must fail there."""
    t = [0.5, -1.0, 2.0]
    model, x, sm, cls, _ = _linear_case(family, 8, t, seed=20)
    r = torch.tensor(np.abs(t) + 1.0)
    check = check_region(model, x, sm, cls, r, steps=20, samples=64, check_samples=10_000, alpha=0.001, seed=21)
    assert check.refuted.all()
    assert (check.winner != cls.numpy()).all()
    assert np.abs(check.p - stats.norm.cdf(-1.0)).max() <= 4 * math.sqrt(0.16 * 0.84 / 10_000)
    # a region just inside the exact one is not refuted: the criterion does not fire by itself
    inside = check_region(model, x, sm, cls, r - 1.3, steps=20, samples=64, check_samples=10_000, seed=21)
    assert not inside.refuted.any()


# --------------------------------------------------------------------------- a small network
def _tiny_network() -> torch.nn.Module:
    torch.manual_seed(30)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return net.double().requires_grad_(False)


def test_tiny_network_no_flip_within_a_certified_region():
    net = _tiny_network()
    x = 0.5 * torch.randn(6, 2, 5, generator=generator(31), dtype=F64)  # image-like inputs (B, 2, 5)
    s = scale_matrix("full", 10, seed=32) * 0.5
    sm = smoothing("full", s, len(x))
    cert = certify(net, x, sm, list(range(len(x))), 100, 10_000, 0.001, seed=33)
    ok = cert.predict != ABSTAIN
    assert ok.sum() >= 3
    sub = torch.from_numpy(np.flatnonzero(ok))
    cls, gap = torch.from_numpy(cert.predict[ok]), torch.tensor(cert.gap[ok])
    check = check_region(net, x[sub], sm[sub], cls, gap, steps=20, samples=64, check_samples=10_000, seed=34)
    assert check.points.shape == x[sub].shape and check.p.shape == check.high.shape == (len(sub),)
    assert not check.refuted.any() and (check.p > 0.5).all()
    np.testing.assert_array_less(_whitened_norm(s, check.points - x[sub]), cert.gap[ok] * (1 + 1e-9))

    # the attack does its job: with common draws, the loss at its point beats the centre and
    # 50 random points of the region's border
    eps = torch.randn(len(sub), 4000, 10, generator=generator(35), dtype=F64)
    u_found = torch.linalg.solve(s, (check.points - x[sub]).flatten(1).T).T
    loss = smoothed_loss(net, x[sub], sm[sub], cls, u_found, eps)
    assert (loss > smoothed_loss(net, x[sub], sm[sub], cls, torch.zeros_like(u_found), eps)).all()
    for seed in range(50):
        u = torch.randn(len(sub), 10, generator=generator(100 + seed), dtype=F64)
        u = u / u.norm(dim=1, keepdim=True) * gap[:, None]
        assert (loss >= smoothed_loss(net, x[sub], sm[sub], cls, u, eps)).all()


def test_zero_radius_and_reproducibility():
    net = _tiny_network()
    x = torch.randn(3, 2, 5, generator=generator(40), dtype=F64)
    sm = smoothing("diagonal", scale_matrix("diagonal", 10, seed=41), 3)
    cls = [0, 1, 2]
    torch.testing.assert_close(attack(net, x, sm, cls, 0.0, steps=5, samples=8), x, rtol=0, atol=0)
    a = attack(net, x, sm, cls, 1.0, steps=5, samples=8, seed=3)
    torch.testing.assert_close(attack(net, x, sm, cls, 1.0, steps=5, samples=8, seed=3), a, rtol=0, atol=0)
    assert not torch.equal(attack(net, x, sm, cls, 1.0, steps=5, samples=8, seed=4), a)
    # per-input radii: an input with r = 0 stays put whatever the others do
    b = attack(net, x, sm, cls, torch.tensor([0.0, 1.0, 2.0], dtype=F64), steps=5, samples=8)
    torch.testing.assert_close(b[0], x[0], rtol=0, atol=0)
    np.testing.assert_allclose(_whitened_norm(torch.diag(sm.param[0]), (b - x)[1:2]), [1.0], rtol=1e-9)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs():
    net = _tiny_network()
    x = torch.randn(2, 2, 5, generator=generator(50), dtype=F64)
    sm = smoothing("isotropic", scale_matrix("isotropic", 10, seed=51), 2)
    assert "r must" in raises_one_line(attack, net, x, sm, [0, 1], -0.5)
    assert "r must" in raises_one_line(attack, net, x, sm, [0, 1], torch.tensor([1.0, float("nan")]))
    assert "r must" in raises_one_line(attack, net, x, sm, [0, 1], torch.ones(3))
    assert "cls" in raises_one_line(attack, net, x, sm, [0], 1.0)
    assert "cls" in raises_one_line(attack, net, x, sm, [0, 3], 1.0, steps=1)  # 3 classes only
    assert "cls" in raises_one_line(attack, net, x, sm, [ABSTAIN, 1], 1.0)
    assert "steps" in raises_one_line(attack, net, x, sm, [0, 1], 1.0, steps=-1)
    assert "samples" in raises_one_line(attack, net, x, sm, [0, 1], 1.0, samples=0)
    assert "step" in raises_one_line(attack, net, x, sm, [0, 1], 1.0, step=0.0)
    raises_one_line(attack, net, x[:1], sm, [0], 1.0)  # one input, two laws
    assert "cls" in raises_one_line(check_region, net, x, sm, [0, 3], 1.0, steps=0, check_samples=10)


def test_an_attack_kept_to_the_box_finds_images_as_damaging_as_a_feasible_point():
    """With box=(0, 1) every point is an image inside the ball; on a linear classifier it moves the
    score at least as far as the closed-form optimum clipped into both sets (a feasible point);
    without the box the same attack leaves [0, 1]."""
    d, sigma = 8, 0.5
    gen = generator(7)
    w = torch.randn(d, generator=gen, dtype=F64)
    model = LinearClassifier(w, 0.3)
    x = 0.2 + 0.6 * torch.rand(3, d, generator=gen, dtype=F64)
    law = smoothing("isotropic", torch.eye(d, dtype=F64) * sigma, 3)
    cls = (model.score(x) > 0).long()
    r = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    free = attack(model, x, law, cls, r, steps=40, samples=16, seed=2)
    boxed = attack(model, x, law, cls, r, steps=40, samples=16, seed=2, box=(0.0, 1.0))
    assert ((free < 0) | (free > 1)).any()
    assert ((boxed >= 0) & (boxed <= 1)).all()
    assert ((boxed - x).norm(dim=1) <= sigma * r * (1 + 1e-9)).all()
    sign = 2.0 * cls.double() - 1
    best = worst_point(model, x, law, r).clamp(0, 1)  # clipped, then pulled into the ball towards x
    shrink = torch.clamp(sigma * r / (best - x).norm(dim=1), max=1.0)
    feasible = x + shrink[:, None] * (best - x)
    assert (sign * model.score(boxed) <= sign * model.score(feasible) + 1e-3).all()


def test_a_box_takes_an_isotropic_law_and_inputs_inside_it():
    model, x, sm, cls, _ = _linear_case("diagonal", 8, [1.0])
    assert "isotropic" in raises_one_line(attack, model, x, sm, cls, 1.0, box=(0.0, 1.0))
    model, x, sm, cls, _ = _linear_case("isotropic", 8, [1.0])
    assert "must lie in the box" in raises_one_line(attack, model, x * 0 + 2.0, sm, cls, 1.0, box=(0.0, 1.0))
