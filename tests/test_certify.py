"""Tests of ``rddrs.core.certify`` against the closed form of a linear classifier.

For the two-class classifier ``f(z) = argmax([0, w.z + b])`` (class 1 iff ``w.z + b > 0``)
under the noise ``x + S eps``, ``w.(x + S eps) + b ~ N(w.x + b, ||S^T w||^2)``, so the
smoothed classifier's top-class probability is exactly ``Phi(|w.x + b| / ||S^T w||)`` and the
smoothed prediction at any point is the base prediction there (``Phi(t) > 1/2`` iff ``t > 0``):
the exact region where it is constant is the half-space on x's side.

Many repetitions of CERTIFY for one input are run in ONE call by repeating the input and its
law and giving each copy its own index (each index owns an independent noise stream).
Statistical checks use fixed seeds and tolerances of several standard deviations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from rddrs import RDDRSError
from rddrs.core.certify import ABSTAIN, certify, predict
from rddrs.core.noise import Diagonal, FullSPD, Isotropic

torch.set_num_threads(1)

F64 = torch.float64
FAMILIES = ["isotropic", "diagonal", "full"]


# --------------------------------------------------------------------------- helpers
class LinearClassifier:
    """Logits ``[0, w.z + b]`` on flattened inputs."""

    def __init__(self, w: torch.Tensor, b: float):
        self.w, self.b = w, float(b)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        s = z.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scale_matrix(family: str, d: int, seed: int) -> torch.Tensor:
    """A random (symmetric) scale matrix S of the family, built without the library."""
    gen = _gen(seed)
    if family == "isotropic":
        return (0.3 + torch.rand((), generator=gen, dtype=F64)) * torch.eye(d, dtype=F64)
    if family == "diagonal":
        return torch.diag(0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    w = 0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64)
    c = (q * w) @ q.T
    return 0.5 * (c + c.T)


def _smoothing(family: str, s: torch.Tensor, reps: int):
    """The law ``x + S eps`` repeated for ``reps`` inputs."""
    d = s.shape[0]
    if family == "isotropic":
        return Isotropic(s[0, 0].repeat(reps), d)
    if family == "diagonal":
        return Diagonal(torch.diagonal(s).repeat(reps, 1))
    return FullSPD(s.repeat(reps, 1, 1))


def _setup(family: str, d: int = 8, seed: int = 0):
    gen = _gen(100 + seed)
    s = _scale_matrix(family, d, seed)
    w = torch.randn(d, generator=gen, dtype=F64)
    b = float(torch.randn((), generator=gen, dtype=F64))
    return s, LinearClassifier(w, b)


def _input_at(model: LinearClassifier, s: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    """An input x with ``(w.x + b) / ||S w|| = t`` (so P(class 1) = Phi(t))."""
    x0 = torch.randn(model.w.shape[0], generator=_gen(seed), dtype=F64)
    target = t * float(torch.linalg.norm(s.T @ model.w))
    return x0 + (target - float(model.score(x0[None])[0])) * model.w / model.w.dot(model.w)


def _exact_p_class1(model: LinearClassifier, s: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    return stats.norm.cdf((model.score(x) / torch.linalg.norm(s.T @ model.w)).numpy())


def _cp_inverse(p_lower: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The count k that gives each Clopper-Pearson bound (k = 0 gives 0)."""
    table = np.concatenate([[0.0], stats.beta.ppf(alpha, np.arange(1, n + 1), n - np.arange(1, n + 1) + 1)])
    k = np.abs(p_lower[:, None] - table[None, :]).argmin(1)
    np.testing.assert_allclose(table[k], p_lower, rtol=1e-9, atol=1e-12)
    return k


def _upper_tolerance(rate: float, reps: int, z: float = 3.0) -> float:
    return rate * reps + z * math.sqrt(rate * (1 - rate) * reps)


# --------------------------------------------------------------------------- (a) coverage
@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_of_the_lower_bound(family):
    n0, n, alpha, reps = 50, 200, 0.1, 200
    s, model = _setup(family, seed=1)
    # two inputs, one on each side: P(top class) = 0.9 (class 1) and 0.8 (class 0)
    xs = [
        _input_at(model, s, float(special.ndtri(0.9)), seed=2),
        _input_at(model, s, float(special.ndtri(0.2)), seed=3),
    ]
    x = torch.stack([xs[0]] * reps + [xs[1]] * reps)
    truth = np.array([1] * reps + [0] * reps)
    p1 = _exact_p_class1(model, s, x)
    p_true = np.where(truth == 1, p1, 1 - p1)
    np.testing.assert_allclose(p_true[[0, -1]], [0.9, 0.8], rtol=1e-9)

    cert = certify(model, x, _smoothing(family, s, 2 * reps), list(range(2 * reps)), n0, n, alpha, seed=7)
    # far enough from 1/2 that selection is right and nothing abstains (probability < 1e-2 for
    # all 400 trials together, whatever the noise stream)
    assert (cert.predict == truth).all()

    failures = int((cert.p_lower > p_true).sum())
    # P(p_lower > p) <= alpha for each trial: a bound at level 2 alpha or a normal
    # approximation would exceed this count
    assert failures <= _upper_tolerance(alpha, 2 * reps)
    # sharper: the exact failure rate of a correct bound with n draws, by the binomial law
    expected = 0.0
    k = np.arange(n + 1)
    table = np.concatenate([[0.0], stats.beta.ppf(alpha, k[1:], n - k[1:] + 1)])
    for p in (0.9, 0.8):
        expected += reps * stats.binom.pmf(k, n, p)[table > p].sum()
    sd = math.sqrt(expected * (1 - expected / (2 * reps)))
    assert abs(failures - expected) <= 4 * sd + 1

    # the counts behind the bounds are Binomial(n, p): the noise has covariance S S^T
    counts = _cp_inverse(cert.p_lower, n, alpha)
    for half, p in ((slice(0, reps), 0.9), (slice(reps, None), 0.8)):
        mean = counts[half].mean()
        assert abs(mean - n * p) <= 4 * math.sqrt(n * p * (1 - p) / reps)
        assert counts[half].var() == pytest.approx(n * p * (1 - p), rel=0.35)


def test_constant_classifier_gives_the_closed_form_bound():
    """All n draws agree: p_lower = alpha^(1/n), gap = Phi^-1(alpha^(1/n))."""
    n, alpha, d = 50, 0.01, 4
    x = torch.zeros(3, d, dtype=F64)

    def model(z):
        return torch.tensor([0.0, 0.0, 1.0], dtype=z.dtype).expand(len(z), 3)

    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    cert = certify(model, x, Isotropic(sigma, d), [0, 1, 2], 5, n, alpha, seed=0)
    np.testing.assert_array_equal(cert.predict, [2, 2, 2])
    np.testing.assert_allclose(cert.p_lower, alpha ** (1 / n), rtol=1e-12)
    np.testing.assert_allclose(cert.gap, special.ndtri(alpha ** (1 / n)), rtol=1e-12)
    np.testing.assert_allclose(cert.radius, cert.gap * sigma.numpy(), rtol=1e-12)
    np.testing.assert_allclose(cert.proxy_radius, cert.gap * sigma.numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- (b) soundness
@pytest.mark.parametrize("family", FAMILIES)
def test_certified_regions_are_sound(family):
    d, batch, n0, n, alpha = 6, 60, 20, 2000, 1e-4
    s, model = _setup(family, d=d, seed=4)
    gen = _gen(5)
    t = torch.randn(batch, generator=gen, dtype=F64) * 1.5  # some near the boundary, some far
    x = torch.stack([_input_at(model, s, float(ti), seed=1000 + i) for i, ti in enumerate(t)])
    smoothing = _smoothing(family, s, batch)
    cert = certify(model, x, smoothing, list(range(batch)), n0, n, alpha, seed=11)

    score = model.score(x).numpy()
    sw = float(torch.linalg.norm(s @ model.w))  # ||S^T w|| = ||S w||: S is symmetric
    p1 = _exact_p_class1(model, s, x)
    ok = cert.predict != ABSTAIN
    assert ok.sum() >= batch // 2  # most inputs are certified: the check below is not vacuous
    assert (cert.predict[~ok] == ABSTAIN).all()
    for name in ("gap", "radius", "proxy_radius"):
        assert (getattr(cert, name)[~ok] == 0).all()

    truth = (score > 0).astype(int)
    p_pred = np.where(cert.predict == 1, p1, 1 - p1)
    uncovered = ok & (cert.p_lower > p_pred)
    # each certificate is wrong with probability <= alpha: at most one of 60 (P(>1) < 2e-5)
    assert uncovered.sum() <= stats.binom.isf(1e-4, batch, alpha)
    sound = ok & ~uncovered
    assert (cert.predict[sound] == truth[sound]).all()
    np.testing.assert_allclose(cert.gap[ok], special.ndtri(cert.p_lower[ok]), rtol=1e-12)
    assert (cert.p_lower[ok] > 0.5).all() and (cert.gap[ok] > 0).all()

    # the region {x + S u : ||u|| < gap} stays in the half-space: |w.x + b| >= gap ||S w||
    reach = cert.gap * sw
    assert (np.abs(score[sound]) >= reach[sound]).all()
    # ... checked directly at the farthest point toward the boundary and at random points
    sign = np.where(cert.predict == 1, 1.0, -1.0)
    u_far = -torch.tensor(sign)[:, None] * (s @ model.w / sw)[None, :]  # unit vectors
    for scale in (1 - 1e-9, 0.5):
        pts = x + (torch.tensor(cert.gap * scale)[:, None] * u_far) @ s.T
        assert (model(pts).argmax(1).numpy()[sound] == cert.predict[sound]).all()
    u = torch.randn(batch, 50, d, generator=gen, dtype=F64)
    u = u / u.norm(dim=-1, keepdim=True) * torch.rand(batch, 50, 1, generator=gen, dtype=F64)
    pts = x[:, None, :] + (torch.tensor(cert.gap)[:, None, None] * u) @ s.T
    classes = model(pts.reshape(-1, d)).argmax(1).reshape(batch, 50).numpy()
    assert (classes[sound] == cert.predict[sound, None]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_radii_definitions(family):
    d, batch = 7, 30
    s, model = _setup(family, d=d, seed=6)
    t = 2.0 + 2 * torch.rand(batch, generator=_gen(7), dtype=F64)  # p >= 0.977: all certified
    x = torch.stack([_input_at(model, s, float(ti), seed=2000 + i) for i, ti in enumerate(t)])
    cert = certify(model, x, _smoothing(family, s, batch), list(range(batch)), 20, 500, 0.01, seed=3)
    ok = cert.predict != ABSTAIN
    assert ok.all()

    eig, vec = np.linalg.eigh(s.numpy())
    sign, logdet = np.linalg.slogdet(s.numpy())
    assert sign > 0
    np.testing.assert_allclose(cert.radius, cert.gap * eig.min(), rtol=1e-10)
    np.testing.assert_allclose(cert.proxy_radius, cert.gap * math.exp(logdet / d), rtol=1e-10)

    # the l2 ball of radius r lambda_min(S) lies inside {S u : ||u|| < r} and touches its border
    s_inv = np.linalg.inv(s.numpy())
    dirs = np.random.default_rng(8).normal(size=(500, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for gap, radius in zip(cert.gap, cert.radius):
        assert (np.linalg.norm(radius * dirs @ s_inv.T, axis=1) <= gap * (1 + 1e-9)).all()
        touch = np.linalg.norm(s_inv @ (radius * vec[:, 0]))
        assert touch == pytest.approx(gap, rel=1e-9)
        assert np.linalg.norm(s_inv @ (1.01 * radius * vec[:, 0])) > gap  # no larger ball fits
    # the proxy radius is the radius of the ball of equal volume (ratio of volumes = det S)
    assert np.allclose((cert.proxy_radius / cert.gap) ** d, np.prod(eig), rtol=1e-9)


# --------------------------------------------------------------------------- (c) abstention
@pytest.mark.parametrize("family", FAMILIES)
def test_boundary_input_abstains(family):
    n0, n, alpha, reps = 20, 200, 0.05, 300
    s, model = _setup(family, seed=9)
    x0 = _input_at(model, s, 0.0, seed=10)
    assert abs(float(model.score(x0[None])[0])) < 1e-12  # p = 1/2
    x = x0.repeat(reps, 1)
    cert = certify(model, x, _smoothing(family, s, reps), list(range(reps)), n0, n, alpha, seed=2)
    abstain = cert.predict == ABSTAIN
    # P(not abstaining) = P(p_lower > 1/2) <= alpha
    assert (~abstain).sum() <= _upper_tolerance(alpha, reps)
    assert abstain.mean() >= 0.9
    for name in ("gap", "radius", "proxy_radius"):
        assert (getattr(cert, name)[abstain] == 0).all()
    assert (cert.p_lower[abstain] <= 0.5).all()
    # both classes get selected (the selection is a fair coin here)
    counts = _cp_inverse(cert.p_lower, n, alpha)
    assert abs(counts.mean() - n / 2) <= 4 * math.sqrt(n / 4 / reps)


# --------------------------------------------------------------------------- (d) predict
@pytest.mark.parametrize("family", FAMILIES)
def test_predict(family):
    s, model = _setup(family, seed=12)
    reps = 40
    far = [_input_at(model, s, 4.0, seed=13), _input_at(model, s, -4.0, seed=14)]
    x = torch.stack([far[0]] * reps + [far[1]] * reps)
    got = predict(model, x, _smoothing(family, s, 2 * reps), list(range(2 * reps)), 100, 0.001, seed=1)
    np.testing.assert_array_equal(got, [1] * reps + [0] * reps)

    reps, alpha = 300, 0.05
    x = _input_at(model, s, 0.0, seed=15).repeat(reps, 1)
    got = predict(model, x, _smoothing(family, s, reps), list(range(reps)), 100, alpha, seed=2)
    assert set(np.unique(got)) <= {ABSTAIN, 0, 1}
    assert (got != ABSTAIN).sum() <= _upper_tolerance(alpha, reps)
    assert (got == ABSTAIN).mean() >= 0.9


# --------------------------------------------------------------------------- (e) reproducibility
def _fields(cert):
    return (cert.predict, cert.p_lower, cert.gap, cert.radius, cert.proxy_radius)


def _assert_same(a, b):
    for fa, fb in zip(_fields(a), _fields(b)):
        np.testing.assert_array_equal(fa, fb)


def _batch_case(family: str, count: int = 6):
    s, model = _setup(family, d=5, seed=16)
    t = torch.linspace(-1.2, 1.2, count, dtype=F64)
    x = torch.stack([_input_at(model, s, float(ti), seed=3000 + i) for i, ti in enumerate(t)])
    return s, model, x


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_certificate_and_seeds_matter(family):
    s, model, x = _batch_case(family)
    sm = _smoothing(family, s, len(x))
    idx = list(range(len(x)))
    a = certify(model, x, sm, idx, 10, 300, 0.05, seed=4)
    b = certify(model, x, sm, idx, 10, 300, 0.05, seed=4)
    _assert_same(a, b)
    c = certify(model, x, sm, idx, 10, 300, 0.05, seed=5)
    assert not np.array_equal(a.p_lower, c.p_lower)
    # different indices are different streams too
    e = certify(model, x, sm, [i + 100 for i in idx], 10, 300, 0.05, seed=4)
    assert not np.array_equal(a.p_lower, e.p_lower)


@pytest.mark.parametrize("n", [300, 2000])
@pytest.mark.parametrize("family", FAMILIES)
def test_certificate_does_not_depend_on_batching(family, n):
    """Noise streams are keyed by index: one call for six inputs equals six calls of one.

    With the default batch_size (10000) six inputs share a batch, so at n = 2000 each
    input's draws come in chunks of 10000 // 6 rows, while alone they come in one chunk.
    """
    s, model, x = _batch_case(family)
    idx = [10, 11, 12, 13, 14, 15]
    sm = _smoothing(family, s, len(x))
    together = certify(model, x, sm, idx, 10, n, 0.05, seed=8)
    for i in range(len(x)):
        alone = certify(model, x[i : i + 1], _smoothing(family, s, 1), [idx[i]], 10, n, 0.05, seed=8)
        for fa, fb in zip(_fields(together), _fields(alone)):
            assert fa[i] == fb[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_certificate_does_not_depend_on_batch_size(family):
    s, model, x = _batch_case(family)
    sm = _smoothing(family, s, len(x))
    idx = list(range(len(x)))
    big = certify(model, x, sm, idx, 10, 300, 0.05, seed=9, batch_size=10_000)
    small = certify(model, x, sm, idx, 10, 300, 0.05, seed=9, batch_size=7)
    _assert_same(big, small)


def test_rotation_gives_the_same_certificate_in_rotated_coordinates():
    """x -> U x, f -> f(U^T .), C -> U C U^T, noise U eps: the same experiment in other coordinates."""
    s, model, x = _batch_case("full")
    d = x.shape[1]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(17), dtype=F64))
    rotated_model = LinearClassifier(q @ model.w, model.b)  # w.(U^T z) = (U w).z
    c_rot = q @ s @ q.T
    idx = list(range(len(x)))
    plain = certify(model, x, _smoothing("full", s, len(x)), idx, 10, 300, 0.05, seed=6)
    rotated = certify(
        rotated_model,
        x @ q.T,
        _smoothing("full", 0.5 * (c_rot + c_rot.T), len(x)),
        idx,
        10,
        300,
        0.05,
        seed=6,
        rotation=q,
    )
    np.testing.assert_array_equal(plain.predict, rotated.predict)
    np.testing.assert_array_equal(plain.p_lower, rotated.p_lower)
    np.testing.assert_allclose(rotated.radius, plain.radius, rtol=1e-9)
    np.testing.assert_allclose(rotated.proxy_radius, plain.proxy_radius, rtol=1e-9)


# --------------------------------------------------------------------------- (f) bad input
def _good():
    s, model = _setup("diagonal", d=4, seed=18)
    x = torch.randn(2, 4, generator=_gen(19), dtype=F64)
    return model, x, _smoothing("diagonal", s, 2)


def _raises_one_line(fn, *args, **kwargs):
    with pytest.raises(RDDRSError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    model, x, sm = _good()
    msg = _raises_one_line(certify, model, x, sm, [0, 1], 10, 100, alpha, seed=0)
    assert "alpha" in msg
    _raises_one_line(predict, model, x, sm, [0, 1], 100, alpha, seed=0)


@pytest.mark.parametrize("n0, n", [(0, 100), (-1, 100), (10, 0), (10, -5), (10, 2.5)])
def test_bad_counts(n0, n):
    model, x, sm = _good()
    _raises_one_line(certify, model, x, sm, [0, 1], n0, n, 0.05, seed=0)
    if n0 >= 1:
        _raises_one_line(predict, model, x, sm, [0, 1], n, 0.05, seed=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input(value):
    model, x, sm = _good()
    x = x.clone()
    x[1, 2] = value
    _raises_one_line(certify, model, x, sm, [0, 1], 10, 100, 0.05, seed=0)
    _raises_one_line(predict, model, x, sm, [0, 1], 100, 0.05, seed=0)


def test_shape_mismatches():
    model, x, sm = _good()
    _raises_one_line(certify, model, torch.cat([x, x]), sm, [0, 1, 2, 3], 10, 100, 0.05, seed=0)  # batch
    _raises_one_line(certify, model, x, sm, [0, 1, 2], 10, 100, 0.05, seed=0)  # indices
    _raises_one_line(certify, model, x[:, :3], sm, [0, 1], 10, 100, 0.05, seed=0)  # features
    _raises_one_line(certify, model, x[0], sm, [0, 1], 10, 100, 0.05, seed=0)  # no batch axis


@pytest.mark.parametrize(
    "wrap, message",
    [
        (
            lambda z, out: torch.where((z < 0).any(-1, keepdim=True), float("nan"), out),
            "NaN or infinite outputs on noisy",
        ),
        (lambda z, out: out[:, 1], "it must give N x K scores of K >= 2 classes"),
        (lambda z, out: out[:, :1], "it must give N x K scores of K >= 2 classes"),
    ],
    ids=["nan-under-noise", "1-d", "one-class"],
)
def test_a_model_with_unusable_outputs_gets_no_certificate(wrap, message):
    """A NaN is the largest value to argmax and one output is always class 0: either would
    certify that class with the largest radius n allows."""
    model, x, sm = _good()
    x = x.abs() + 1  # the clean inputs are positive, some noisy copies are not
    assert torch.isfinite(wrap(x, model(x))).all()
    msg = _raises_one_line(certify, lambda z: wrap(z, model(z)), x, sm, [0, 1], 10, 100, 0.05, seed=0)
    assert message in msg


@pytest.mark.parametrize(
    "make",
    [
        lambda: Isotropic(torch.tensor([0.5, 0.0]), 4),
        lambda: Isotropic(torch.tensor([0.5, -0.2]), 4),
        lambda: Isotropic(torch.tensor([[0.5, 0.5]]), 4),
        lambda: Diagonal(torch.tensor([[0.5, 0.0, 1.0]])),
        lambda: Diagonal(torch.tensor([0.5, 1.0, 1.0])),
        lambda: Diagonal(torch.tensor([[0.5, float("nan"), 1.0]])),
        lambda: FullSPD(torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])),  # indefinite
        lambda: FullSPD(torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])),  # not symmetric
        lambda: FullSPD(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])),  # singular
        lambda: FullSPD(torch.eye(3)),  # no batch axis
        lambda: FullSPD(torch.ones(2, 3, 4)),  # not square
    ],
    ids=[
        "sigma0",
        "sigma<0",
        "sigma-shape",
        "theta0",
        "theta-shape",
        "theta-nan",
        "C-indef",
        "C-nonsym",
        "C-singular",
        "C-shape",
        "C-nonsquare",
    ],
)
def test_bad_smoothing_parameters(make):
    _raises_one_line(make)
