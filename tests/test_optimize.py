"""The per-input searches: gradients, ascent, invariance, SPD-ness, the papers' settings."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.certify import certify
from rddrs.core.methods import METHODS
from rddrs.core.noise import Diagonal, FullSPD, Isotropic
from rddrs.core.optimize import find_smoothing, objective_and_gradient, search
from rddrs.core.presets import ANCER, DDRS, RDDRS, Search
from rddrs.core.spd import random_orthogonal

torch.set_num_threads(1)


def smooth_model(d: int, k: int = 3, seed: int = 0, dtype=torch.float64):
    """A small smooth network R^d -> R^k (logits)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, d, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(k, 16, generator=g, dtype=dtype) * 2

    def model(z):
        return torch.tanh(z.reshape(len(z), -1) @ w1.T * 3) @ w2.T

    return model


D = 6
DISTINCT = torch.linspace(0.4, 2.0, D, dtype=torch.float64)  # a simple lambda_min
MODEL = smooth_model(D)
X = 0.4 * torch.randn(3, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
EPS = torch.randn(3, 3000, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def objective(smoothing, kappa=0.5):
    return objective_and_gradient(MODEL, X, smoothing, EPS, kappa)[0]


def test_riemannian_gradient_matches_finite_difference_along_geodesics():
    c = spd.random_spd(D, batch=(3,), eigenvalues=DISTINCT, seed=0)
    _, grad = objective_and_gradient(MODEL, X, FullSPD(c), EPS, kappa=0.5)
    v = spd.sym(torch.randn(3, D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    h = 1e-4
    fd = (objective(FullSPD(spd.exp(c, h * v))) - objective(FullSPD(spd.exp(c, -h * v)))) / (2 * h)
    torch.testing.assert_close(spd.inner(c, grad, v), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["isotropic", "diagonal"])
def test_euclidean_gradients_match_finite_differences(family):
    g = torch.Generator().manual_seed(4)
    if family == "isotropic":
        param, make = 0.3 + torch.rand(3, generator=g, dtype=torch.float64), lambda p: Isotropic(p, D)
    else:
        param, make = 0.3 + torch.rand(3, D, generator=g, dtype=torch.float64), Diagonal
    _, grad = objective_and_gradient(MODEL, X, make(param), EPS, kappa=0.5)
    v = torch.randn(param.shape, generator=g, dtype=torch.float64)
    h = 1e-6
    fd = (objective(make(param + h * v)) - objective(make(param - h * v))) / (2 * h)
    torch.testing.assert_close((grad * v).reshape(3, -1).sum(1), fd, rtol=1e-5, atol=1e-8)


def test_exponential_map_step_increases_the_objective():
    fam = FullSPD(spd.random_spd(D, batch=(3,), eigenvalues=DISTINCT, seed=5))
    value, grad = objective_and_gradient(MODEL, X, fam, EPS, kappa=0.5)
    after = objective(fam.step(1e-2 * grad))
    assert (after > value).all()
    # and a step against the gradient decreases it: the ascent direction is not arbitrary
    assert (objective(fam.step(-1e-2 * grad)) < value).all()


def _rotated(model, u):
    return lambda z: model((z.reshape(len(z), -1) @ u).reshape(z.shape))  # f(U^T z), rows z^T U


SMALL = {
    "ddrs": Search(40, 400, 2e-2, scale=0.5, keep_best_every=10),
    "ancer": Search(20, 400, 0.04, kappa=2.0, step="adam"),
    "rddrs": Search(20, 400, 0.2, kappa=1e-6),
}


@pytest.mark.parametrize("method", ["rs", "ddrs", "rddrs"])
def test_rotation_invariance(method):
    """(f(U^T .), U x) with noise U Z (common random numbers) gives the same certificate."""
    u = random_orthogonal(D, seed=6)
    idx = list(range(len(X)))
    plain, _ = find_smoothing(method, MODEL, X, idx, 0.3, seed=7, settings=SMALL)
    turned, _ = find_smoothing(method, _rotated(MODEL, u), X @ u.T, idx, 0.3, seed=7, settings=SMALL, rotation=u)
    torch.testing.assert_close(turned.proxy(), plain.proxy(), rtol=1e-9, atol=0)
    torch.testing.assert_close(turned.min_scale(), plain.min_scale(), rtol=1e-9, atol=0)
    if method == "rddrs":  # the matrix itself turns with the data: C' = U C U^T
        torch.testing.assert_close(turned.matrix(), u @ plain.matrix() @ u.T, rtol=1e-9, atol=1e-12)
        assert spd.distance(plain.matrix(), turned.matrix()).max() > 1e-3  # and is not U-invariant itself
    a = certify(MODEL, X, plain, idx, 50, 2000, 0.01, seed=8)
    b = certify(_rotated(MODEL, u), X @ u.T, turned, idx, 50, 2000, 0.01, seed=8, rotation=u)
    np.testing.assert_array_equal(a.predict, b.predict)
    np.testing.assert_allclose(b.proxy_radius, a.proxy_radius, rtol=1e-9)


def test_ancer_is_not_rotation_invariant():
    u = random_orthogonal(D, seed=6)
    idx = list(range(len(X)))
    plain, _ = find_smoothing("ancer", MODEL, X, idx, 0.3, seed=7, settings=SMALL)
    turned, _ = find_smoothing("ancer", _rotated(MODEL, u), X @ u.T, idx, 0.3, seed=7, settings=SMALL, rotation=u)
    rel = (turned.proxy() - plain.proxy()).abs() / plain.proxy()
    assert rel.max() > 1e-2  # seven orders of magnitude above what RDDRS' invariance test allows


def test_matrices_stay_spd_and_floored_through_100_float32_steps():
    d = 40
    model = smooth_model(d, dtype=torch.float32)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(9))
    floor = torch.tensor([0.2, 0.25, 0.3, 0.35])
    fam = FullSPD(torch.eye(d).expand(4, d, d) * floor.view(-1, 1, 1))
    g = torch.Generator().manual_seed(10)
    floor_hit = torch.zeros(4, dtype=torch.bool)
    for _ in range(100):
        eps = torch.randn(4, 200, d, generator=g)
        _, grad = objective_and_gradient(model, x, fam, eps, kappa=1e-6)
        fam = fam.step(0.2 * grad).floor(floor)
        assert fam.matrix().dtype == torch.float32
        spd.check_spd(fam.matrix(), "iterate")
        w = torch.linalg.eigvalsh(fam.matrix().double())
        # float32 storage of C holds eigenvalues to about eps32 * lambda_max
        assert (w[:, 0] >= floor.double() - 10 * torch.finfo(torch.float32).eps * w[:, -1]).all()
        floor_hit |= w[:, 0] < floor.double() * 1.001
    assert floor_hit.all()  # the floor was active
    assert (w[:, -1] > 3 * floor.double()).all()  # and the matrices moved far from the start


def test_search_trace_and_floor():
    idx = [0, 1, 2]
    init = Isotropic(torch.full((3,), 0.3, dtype=torch.float64), D).as_full()
    found = search(MODEL, X, init, idx, SMALL["rddrs"], lower=0.3, seed=0)
    assert found.trace.shape == (3, SMALL["rddrs"].iterations)
    assert np.isfinite(found.trace).all()
    assert (found.trace[:, -5:].mean(1) > found.trace[:, :5].mean(1)).all()  # the ascent made progress
    assert (found.smoothing.min_scale() >= 0.3 * (1 - 1e-9)).all()


def test_keep_best_returns_the_best_checkpoint_iterate():
    idx = [0, 1, 2]
    base = Isotropic(torch.full((3,), 0.3, dtype=torch.float64), D)
    settings = SMALL["ddrs"]
    kept = search(MODEL, X, base, idx, settings, lower=1e-3, seed=3)
    checkpoints = np.arange(settings.keep_best_every - 1, settings.iterations, settings.keep_best_every)
    for i in idx:
        t = checkpoints[np.argmax(kept.trace[i, checkpoints])]
        # the iterate evaluated at iteration t is the result of t steps
        replay = search(MODEL, X, base, idx, Search(int(t), settings.samples, settings.lr, scale=0.5), 1e-3, seed=3)
        torch.testing.assert_close(kept.smoothing.param[i], replay.smoothing.param[i])


def test_ddrs_gives_confident_inputs_different_sigmas():
    """No clamp: two confident inputs with different margins do not get the same sigma."""
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def linear(z):
        s = z.reshape(len(z), -1) @ w
        return torch.stack([torch.zeros_like(s), 8 * s], 1)

    x = torch.tensor([[2.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    found = search(
        linear,
        x,
        Isotropic(torch.full((2,), 0.12, dtype=torch.float64), 2),
        [0, 1],
        Search(200, 200, 1e-3, scale=0.5),
        lower=1e-3,
        seed=0,
    )
    sigma = found.smoothing.param
    assert (sigma > 0.12).all()  # both grew from sigma=0.12, where G_A is within 1e-50 of 1
    assert sigma[1] > sigma[0] * 1.05


def test_search_is_reproducible_and_independent_of_batching():
    init = Diagonal(torch.full((3, D), 0.3, dtype=torch.float64))
    a = search(MODEL, X, init, [0, 1, 2], SMALL["ancer"], 0.3, seed=11)
    b = search(MODEL, X, init, [0, 1, 2], SMALL["ancer"], 0.3, seed=11)
    torch.testing.assert_close(a.smoothing.param, b.smoothing.param, rtol=0, atol=0)
    single = search(MODEL, X[1:2], init[1:2], [1], SMALL["ancer"], 0.3, seed=11)
    torch.testing.assert_close(single.smoothing.param[0], a.smoothing.param[1])
    c = search(MODEL, X, init, [0, 1, 2], SMALL["ancer"], 0.3, seed=12)
    assert not torch.equal(a.smoothing.param, c.smoothing.param)


def test_paper_settings():
    assert (DDRS.lr, DDRS.samples, DDRS.iterations, DDRS.keep_best_every) == (1e-4, 100, 1500, 100)
    assert (ANCER.lr, ANCER.kappa, ANCER.iterations, ANCER.samples, ANCER.step) == (0.04, 2.0, 100, 100, "adam")
    assert (RDDRS.kappa, RDDRS.iterations, RDDRS.samples) == (1e-6, 100, 20_000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(iterations=-1, samples=10, lr=0.1), "iterations"),
        (dict(iterations=10, samples=0, lr=0.1), "samples"),
        (dict(iterations=10, samples=10, lr=0.0), "learning rate"),
        (dict(iterations=10, samples=10, lr=0.1, kappa=-1.0), "kappa"),
        (dict(iterations=10, samples=10, lr=float("inf")), "learning rate must be finite"),
        (dict(iterations=10, samples=10, lr=float("nan")), "learning rate must be finite"),
        (dict(iterations=10, samples=10, lr=0.1, kappa=float("nan")), "kappa must be finite"),
        (dict(iterations=10, samples=10, lr=0.1, kappa=float("inf")), "kappa must be finite"),
        (dict(iterations=10, samples=10, lr=0.1, max_step=float("inf")), "max_step must be finite"),
        (dict(iterations=10, samples=10, lr=0.1, scale=float("nan")), "scale must be finite"),
        (dict(iterations=10, samples=10, lr=0.1, keep_best_every=0), "keep_best_every"),
        (dict(iterations=2.5, samples=10, lr=0.1), "integers"),
    ],
)
def test_bad_search_settings(kwargs, message):
    with pytest.raises(RDDRSError, match=message):
        Search(**kwargs)


def test_bad_method_and_sigma():
    with pytest.raises(RDDRSError, match="unknown method"):
        find_smoothing("cohen", MODEL, X, [0, 1, 2], 0.3, seed=0)
    with pytest.raises(RDDRSError, match="sigma"):
        find_smoothing("rs", MODEL, X, [0, 1, 2], 0.0, seed=0)
    with pytest.raises(RDDRSError, match="NaN"):
        find_smoothing("ddrs", MODEL, X * float("nan"), [0, 1, 2], 0.3, seed=0, settings=SMALL)


def test_max_step_bounds_how_much_any_scale_changes():
    c = spd.random_spd(D, batch=(3,), eigenvalues=DISTINCT, seed=12)
    big = 50 * spd.sym(torch.randn(3, D, D, generator=torch.Generator().manual_seed(13), dtype=torch.float64))
    moved = FullSPD(c).step(big, max_step=0.1).matrix()
    _, inv_root = spd.sqrt_and_inv_sqrt(c)
    log_ratio = torch.linalg.eigvalsh(inv_root @ moved @ inv_root).log()
    torch.testing.assert_close(log_ratio.abs().amax(-1), torch.full((3,), 0.1, dtype=torch.float64))
    small = 1e-4 * big  # a step inside the bound is the plain exponential map
    torch.testing.assert_close(FullSPD(c).step(small, max_step=0.1).matrix(), spd.exp(c, small))
    theta = 0.5 + torch.rand(3, D, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    stepped = Diagonal(theta).step(torch.randn(3, D, dtype=torch.float64) * 10, max_step=0.1).param
    torch.testing.assert_close(((stepped - theta).abs() / theta).amax(-1), torch.full((3,), 0.1, dtype=torch.float64))
    with pytest.raises(RDDRSError, match="max_step"):
        Search(10, 10, 0.1, max_step=0.0)


# -- searches that must find what is known ----------------------------------------------------


def _interval_model(length: float, sharpness: float, normal: torch.Tensor):
    """Two classes; class 0 where ``|normal . y| < length`` (soft edges of the given sharpness)."""

    def model(y):
        z = y.reshape(len(y), -1) @ normal
        return torch.stack([sharpness * (length - z.abs()), torch.zeros_like(z)], 1)

    return model


def test_ddrs_finds_the_interior_optimum():
    """A 1-D classifier whose DDRS objective sigma Phi^-1(G_A(sigma)) has one interior maximum,
    found independently by quadrature and scipy's bounded scalar minimiser."""
    from scipy import integrate, optimize as sopt, special

    length, sharpness, x0 = 1.0, 6.0, 0.3

    def g_a(s):
        density = lambda e: (
            special.expit(sharpness * (length - abs(x0 + s * e))) * np.exp(-e * e / 2) / np.sqrt(2 * np.pi)
        )
        return integrate.quad(density, -12, 12, points=[(-length - x0) / s, (length - x0) / s], limit=200)[0]

    best = sopt.minimize_scalar(
        lambda s: -s * special.ndtri(g_a(s)), bounds=(0.05, 3.0), method="bounded", options={"xatol": 1e-6}
    )
    assert 0.3 < best.x < 1.0  # interior, away from the start
    model = _interval_model(length, sharpness, torch.ones(1, dtype=torch.float64))
    x = torch.tensor([[x0]], dtype=torch.float64)
    found = search(
        model,
        x,
        Isotropic(torch.tensor([0.2], dtype=torch.float64), 1),
        [0],
        Search(300, 2000, 0.05, scale=0.5),
        1e-3,
        seed=0,
    )
    assert float(found.smoothing.param) == pytest.approx(best.x, rel=0.03)


def test_rddrs_stretches_along_a_tilted_strip():
    """Class 0 on a strip along (1, 1): DDRS is bound by its width, ANCER's axes cannot follow it,
    RDDRS stretches C along it; so RDDRS' certified proxy radius is at least DDRS' (here far more)."""
    normal = torch.tensor([1.0, -1.0], dtype=torch.float64) / 2**0.5
    model = _interval_model(1.0, 6.0, normal)
    x = torch.tensor([[0.1, 0.2], [-0.3, 0.1]], dtype=torch.float64)
    settings = {
        "ddrs": Search(200, 1000, 0.05, scale=0.5),
        "ancer": Search(60, 1000, 0.05, kappa=2.0, step="adam"),
        "rddrs": Search(60, 1000, 0.5, kappa=1e-6, max_step=0.1),
    }
    proxy = {}
    for method in ("ddrs", "ancer", "rddrs"):
        law, _ = find_smoothing(method, model, x, [0, 1], 0.2, seed=0, settings=settings)
        proxy[method] = certify(model, x, law, [0, 1], 100, 4000, 0.001, seed=1).proxy_radius
    assert (proxy["rddrs"] >= proxy["ddrs"]).all() and (proxy["rddrs"] > 3 * proxy["ddrs"]).all()
    assert (proxy["ancer"] < 1.2 * proxy["ddrs"]).all()
    w, v = torch.linalg.eigh(law.matrix())
    along = torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5
    assert (abs(v[:, :, -1] @ along) > 0.99).all()  # the long axis of C lies along the strip


OPTIONS = [
    dict(objective=o, step=s, control_variate=cv)
    for o in ("soft", "clamped", "capped")
    for s in ("sgd", "adam")
    for cv in (False, True)
]


@pytest.mark.parametrize("method", ["ddrs", "ancer", "rddrs"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_search_option_stays_sound_on_a_linear_classifier(method, options):
    """Whatever the search did, the certified ellipsoid {x + S u : |u| < gap} stays on the
    correct side of a linear classifier's boundary, and the l2 radius below the distance to it."""
    from dataclasses import replace

    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0, 0.3], dtype=torch.float64)
    b = 0.2

    def linear(z):
        s = z.reshape(len(z), -1) @ w + b
        return torch.stack([torch.zeros_like(s), 4 * s], 1)

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, D, generator=gen, dtype=torch.float64)
    extra = {"cap": 3.0} if options["objective"] == "capped" else {}
    lr = {"ddrs": 1e-2, "ancer": 0.05, "rddrs": 0.5}[method]
    settings = {
        m: replace(
            SMALL[m],
            iterations=8,
            samples=64,
            lr=lr if m == method else SMALL[m].lr,
            **(options | extra if m == method else {}),
        )
        for m in ("ddrs", method)
    }
    law, _ = find_smoothing(method, linear, x, [0, 1, 2, 3], 0.3, seed=0, settings=settings)
    cert = certify(linear, x, law, [0, 1, 2, 3], 100, 4000, 1e-6, seed=1)
    margin = (x @ w + b).numpy()
    s_w = (law.matrix() @ w).norm(dim=-1).numpy()  # how far w.x moves per unit of u
    certified = cert.predict != -1
    assert certified.any()
    assert (cert.predict[certified] == (margin[certified] > 0)).all()
    assert (cert.gap[certified] * s_w[certified] <= np.abs(margin[certified]) + 1e-9).all()
    assert (cert.radius[certified] <= np.abs(margin[certified]) / float(w.norm()) + 1e-9).all()


def test_control_variate_keeps_the_mean_and_cuts_the_noise():
    law = FullSPD(spd.random_spd(D, batch=(3,), seed=5) * 0.05)
    gen = torch.Generator().manual_seed(0)

    def estimates(m, cv, reps):
        return torch.stack(
            [
                objective_and_gradient(
                    MODEL, X, law, torch.randn(3, m, D, generator=gen, dtype=torch.float64), 0.0, control_variate=cv
                )[1]
                for _ in range(reps)
            ]
        )

    reference = estimates(100_000, False, 1)[0]
    norm = lambda v: law.inner(v, v).sqrt() / law.inner(reference, reference).sqrt()
    plain, cv = estimates(64, False, 200), estimates(64, True, 200)
    plain_error = torch.stack([norm(e - reference) for e in plain]).median(0).values
    cv_error = torch.stack([norm(e - reference) for e in cv]).median(0).values
    assert (cv_error < 0.8 * plain_error).all()
    assert (norm(cv.mean(0) - reference) < 0.02).all()  # no more bias than the plain estimate's own


def test_a_diverging_input_stops_at_its_last_finite_law_and_the_others_go_on():
    """Too large a step overflows the exponential map of one input (image 2 at its 4th step):
    that input stops there with its last finite law and a NaN trace after it, and says where
    (``diverged_at``); the others' searches are those of a run without it."""
    init = Isotropic(torch.full((3,), 0.3, dtype=torch.float64), D).as_full()
    wild = Search(8, 64, 6.0)
    found = search(MODEL, X, init, [0, 1, 2], wild, 0.3, 0)
    assert found.diverged_at.tolist() == [0, 0, 4]
    assert torch.isfinite(found.smoothing.param).all()
    assert np.isfinite(found.trace[2, :4]).all() and np.isnan(found.trace[2, 4:]).all()  # H of its last law, then none
    assert np.isfinite(found.trace[:2]).all()
    last_finite = search(MODEL, X[2:], init[2:], [2], replace(wild, iterations=3), 0.3, 0)
    torch.testing.assert_close(found.smoothing.param[2], last_finite.smoothing.param[0], rtol=0, atol=0)
    others = search(MODEL, X[:2], init[:2], [0, 1], wild, 0.3, 0)
    torch.testing.assert_close(found.smoothing.param[:2], others.smoothing.param)
    np.testing.assert_allclose(found.trace[:2], others.trace)
    calm = search(MODEL, X, init, [0, 1, 2], replace(wild, lr=2.0), 0.3, 0)  # a sane step size does not stop
    assert calm.diverged_at.tolist() == [0, 0, 0]


def test_a_non_finite_law_is_refused():
    law = Diagonal(torch.full((3, D), 0.3, dtype=torch.float64)).with_param(
        torch.full((3, D), float("nan"), dtype=torch.float64)
    )
    with pytest.raises(RDDRSError, match="NaN or infinite scales"):
        certify(MODEL, X, law, [0, 1, 2], 10, 100, 0.01, seed=0)


@pytest.mark.parametrize("control_variate", [False, True])
@pytest.mark.parametrize("family", ["isotropic", "diagonal", "full"])
def test_chunked_gradient_equals_the_gradient_of_all_draws_at_once(family, control_variate):
    from rddrs.core import objectives

    law = {
        "isotropic": Isotropic(torch.tensor([0.3, 0.4, 0.5], dtype=torch.float64), D),
        "diagonal": Diagonal(
            0.2 + 0.3 * torch.rand(3, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ),
        "full": FullSPD(spd.random_spd(D, batch=(3,), seed=2) * 0.4),
    }[family]
    eps = EPS[:, :1000]
    clamp = METHODS[{"isotropic": "ddrs", "diagonal": "ancer", "full": "rddrs"}[family]].clamp
    for objective in (objectives.Soft(), objectives.Capped(1.0), objectives.build("clamped", clamp)):
        whole = objective_and_gradient(MODEL, X, law, eps, 0.5, objective=objective, control_variate=control_variate)
        parts = objective_and_gradient(
            MODEL, X, law, eps, 0.5, objective=objective, control_variate=control_variate, chunk=300
        )
        torch.testing.assert_close(parts[0], whole[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(parts[1], whole[1], rtol=1e-9, atol=1e-12)


# -- RDDRS restricted to diagonal C -----------------------------------------------------------

THETA = 0.3 + torch.rand(3, D, generator=torch.Generator().manual_seed(21), dtype=torch.float64)


def test_at_a_diagonal_C_the_diagonal_of_rddrs_gradient_is_ancers_in_the_affine_invariant_metric():
    """At C = diag(theta) the metric is sum du_i^2 / theta_i^2 on the diagonal matrices, so the
    diagonal of the Riemannian gradient must be theta^2 times the Euclidean gradient in theta,
    which the diagonal family (ANCER's) gets from autograd on the same draws."""
    value_full, grad_full = objective_and_gradient(MODEL, X, Diagonal(THETA).as_full(), EPS, kappa=0.5)
    value_diag, grad_diag = objective_and_gradient(MODEL, X, Diagonal(THETA), EPS, kappa=0.5)
    torch.testing.assert_close(value_full, value_diag)
    torch.testing.assert_close(torch.diagonal(grad_full, dim1=-2, dim2=-1), THETA**2 * grad_diag)
    assert torch.diagonal(grad_full, dim1=-2, dim2=-1).abs().amax() > 0.1 * grad_full.abs().amax()


def test_a_diagonal_only_search_keeps_C_diagonal_and_steps_by_the_exponential_map():
    lr, idx = 0.5, [0, 1, 2]
    settings = replace(SMALL["rddrs"], iterations=1, lr=lr, max_step=None, diagonal=True)
    found = search(MODEL, X, Diagonal(THETA).as_full(), idx, settings, lower=0.1, seed=3)
    from rddrs.core.noise import NoiseSource

    eps = NoiseSource(3, NoiseSource.OPTIMIZE).draw(idx, settings.samples, D, X.dtype)
    _, grad = objective_and_gradient(MODEL, X, Diagonal(THETA), eps, settings.kappa)
    # Exp_C(lr U) for diagonal C and U is diag(theta exp(lr u / theta)), u = theta^2 grad
    expected = torch.clamp(THETA * torch.exp(lr * THETA * grad), min=0.1)
    torch.testing.assert_close(found.smoothing.matrix(), torch.diag_embed(expected))
    many = search(
        MODEL, X, Diagonal(THETA).as_full(), idx, replace(settings, iterations=20, step="adam"), lower=0.3, seed=3
    ).smoothing.matrix()
    off = many - torch.diag_embed(torch.diagonal(many, dim1=-2, dim2=-1))
    assert off.abs().amax() == 0 and not torch.allclose(many, Diagonal(THETA).as_full().matrix())
    free = search(
        MODEL,
        X,
        Diagonal(THETA).as_full(),
        idx,
        replace(settings, iterations=20, step="adam", diagonal=False),
        lower=0.3,
        seed=3,
    ).smoothing.matrix()
    assert (
        free - torch.diag_embed(torch.diagonal(free, dim1=-2, dim2=-1))
    ).abs().amax() > 1e-3  # which it was free to leave


def test_a_diagonal_only_search_is_for_rddrs():
    with pytest.raises(RDDRSError, match="diagonal-only.*diagonal family"):
        search(MODEL, X, Diagonal(THETA), [0, 1, 2], replace(SMALL["ancer"], diagonal=True), lower=0.1, seed=0)
