"""Tests of ``rddrs.core.noise``: smoothing families, their certificate factors and gradients, seeded noise.

Conventions under test (``rddrs.core.noise``'s module docstring and ``FullSPD.grad_proxy``,
``FullSPD.grad_min_scale``): noise is ``x + S eps`` with ``eps ~ N(0, I_d)``, covariance
``S S^T``; proxy factor ``det(S)^(1/d)``, smallest scale ``lambda_min(S)``; for the full family
the Riemannian gradients under ``g_C(A, B) = tr(C^-1 A C^-1 B)`` are ``grad P = (P/d) C`` and
``grad K = lambda_min^2 v v^T``.

References are built independently: SPD matrices from known eigenvalues and a random
orthogonal basis, ``torch.linalg`` eigenvalues, autograd and finite differences.
"""

from __future__ import annotations

import pytest
import torch

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.certify import sample_counts
from rddrs.core.noise import Diagonal, FullSPD, Isotropic, NoiseSource, noisy_outputs

torch.set_num_threads(1)

F32, F64 = torch.float32, torch.float64
FAMILIES = ["isotropic", "diagonal", "full"]


# --------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(b: int, d: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=F64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).to(dtype)


def _spd_with_eigenvalues(w: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """C = Q diag(w) Q^T (symmetrised exactly) and Q, for w of shape (B, d)."""
    q = _orthogonal(w.shape[0], w.shape[1], gen, w.dtype)
    c = (q * w.unsqueeze(-2)) @ q.transpose(-1, -2)
    return 0.5 * (c + c.transpose(-1, -2)), q


def _make(family: str, b: int, d: int, seed: int = 0, dtype=F64):
    """A smoothing batch and its dense scale matrices and eigenvalues built independently."""
    gen = _gen(seed)
    if family == "isotropic":
        sigma = (0.2 + torch.rand(b, generator=gen, dtype=F64)).to(dtype)
        eye = torch.eye(d, dtype=dtype)
        return Isotropic(sigma, d), sigma[:, None, None] * eye, sigma[:, None].expand(b, d)
    if family == "diagonal":
        theta = (0.1 + 2 * torch.rand(b, d, generator=gen, dtype=F64)).to(dtype)
        return Diagonal(theta), torch.diag_embed(theta), theta.sort(-1).values
    w = (0.1 + 2 * torch.rand(b, d, generator=gen, dtype=F64)).sort(-1).values.to(dtype)
    c, _ = _spd_with_eigenvalues(w, gen)
    return FullSPD(c), c, w


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("family", FAMILIES)
def test_scale_noise_is_matrix_times_eps(family):
    s, mat, _ = _make(family, b=3, d=6, seed=1)
    eps = torch.randn(3, 11, 6, generator=_gen(2), dtype=F64)
    got = s.scale_noise(eps)
    assert got.shape == (3, 11, 6)
    torch.testing.assert_close(got, eps @ mat.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.matrix(), mat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_empirical_covariance_is_s_s_transpose(family):
    b, d, m = 2, 4, 40_000
    s, mat, _ = _make(family, b=b, d=d, seed=3)
    eps = torch.randn(b, m, d, generator=_gen(4), dtype=F64)
    y = s.scale_noise(eps)
    emp = y.transpose(-1, -2) @ y / m  # mean zero is known
    want = mat @ mat.transpose(-1, -2)
    diag = torch.diagonal(want, dim1=-2, dim2=-1)
    std = ((diag[:, :, None] * diag[:, None, :] + want**2) / m).sqrt()  # std of each entry
    assert ((emp - want).abs() <= 5 * std).all()
    if family == "full":  # the covariance is C^2, not C (the paper's sampling x + C Z)
        assert not ((emp - mat).abs() <= 5 * std).all()


def test_noisy_outputs_feeds_the_model_x_plus_s_eps_in_input_shape():
    b, m = 2, 5
    x = torch.randn(b, 1, 2, 3, generator=_gen(0), dtype=F64)
    s, mat, _ = _make("full", b=b, d=6, seed=1)
    eps = torch.randn(b, m, 6, generator=_gen(2), dtype=F64)
    seen = []

    def model(z):
        seen.append(z.shape)
        return z.flatten(1)

    out = noisy_outputs(model, x, s, eps)
    assert seen == [(b * m, 1, 2, 3)]
    want = x.reshape(b, 1, 6) + eps @ mat.transpose(-1, -2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- certificate factors
@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_and_min_scale_small(family):
    s, mat, w = _make(family, b=4, d=7, seed=5)
    det = torch.linalg.det(mat)
    torch.testing.assert_close(s.proxy(), det ** (1 / 7), rtol=1e-10, atol=0)
    torch.testing.assert_close(s.log_proxy(), det.log() / 7, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.min_scale(), w[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(s.min_scale(), torch.linalg.eigvalsh(mat)[:, 0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("level", [0.1, 10.0])
@pytest.mark.parametrize("family", ["diagonal", "full"])
def test_proxy_in_log_space_at_d_784(family, level, dtype):
    d, b = 784, 2
    gen = _gen(7)
    w = level * torch.exp(0.3 * torch.randn(b, d, generator=gen, dtype=F64))
    want = torch.exp(w.log().mean(-1))  # exp(mean log eigenvalues), computed from the construction
    if family == "diagonal":
        s, mat_eig = Diagonal(w.to(dtype)), w
    else:
        c, _ = _spd_with_eigenvalues(w, gen)
        s = FullSPD(c.to(dtype))
        mat_eig = torch.linalg.eigvalsh(c)
        torch.testing.assert_close(torch.exp(mat_eig.log().mean(-1)), want, rtol=1e-8, atol=0)
    # the plain product of 784 scales under/overflows even in float64: log space is needed
    naive = w.to(dtype).prod(-1)
    assert ((naive == 0) | torch.isinf(naive)).all()
    got = s.proxy()
    assert torch.isfinite(got).all() and (got > 0).all()
    rtol = 1e-4 if dtype == F32 else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(s.min_scale().double(), w.amin(-1), rtol=rtol * 10, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_floor_scalar_and_per_input(family):
    b, d = 4, 5
    s, mat, w = _make(family, b=b, d=d, seed=9)
    for lower in (0.7, torch.tensor([0.05, 0.6, 1.2, 3.0], dtype=F64)):
        lo = torch.as_tensor(lower, dtype=F64).expand(b)
        f = s.floor(lower)
        assert type(f) is type(s)
        torch.testing.assert_close(f.min_scale(), torch.maximum(w[:, 0], lo), rtol=1e-10, atol=1e-12)
        got_w = torch.linalg.eigvalsh(f.matrix())
        torch.testing.assert_close(got_w, torch.maximum(w, lo[:, None]), rtol=1e-10, atol=1e-12)
        if family == "full":  # eigenvectors are kept: f commutes with C
            fm = f.matrix()
            torch.testing.assert_close(fm @ mat, mat @ fm, rtol=1e-9, atol=1e-10)
    # a floor below every scale changes nothing
    torch.testing.assert_close(s.floor(1e-3).matrix(), mat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_getitem_selects_inputs(family):
    s, mat, w = _make(family, b=5, d=4, seed=11)
    if family == "full":
        _ = s.min_scale()  # fill the cached eigendecomposition before slicing
    for index in (slice(1, 4), torch.tensor([4, 0, 2]), torch.tensor([True, False, True, True, False])):
        sub = s[index]
        assert type(sub) is type(s) and sub.dim == 4
        torch.testing.assert_close(sub.matrix(), mat[index], rtol=0, atol=0)
        torch.testing.assert_close(sub.min_scale(), w[index][:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sub.proxy(), torch.exp(w[index].log().mean(-1)), rtol=1e-10, atol=0)


def test_isotropic_as_diagonal_and_full_describe_the_same_law():
    s, mat, _ = _make("isotropic", b=3, d=5, seed=12)
    eps = torch.randn(3, 8, 5, generator=_gen(13), dtype=F64)
    for other, kind in ((s.as_diagonal(), Diagonal), (s.as_full(), FullSPD)):
        assert isinstance(other, kind) and other.dim == 5 and other.batch == 3
        torch.testing.assert_close(other.matrix(), mat, rtol=0, atol=0)
        torch.testing.assert_close(other.proxy(), s.proxy(), rtol=1e-12, atol=0)
        torch.testing.assert_close(other.min_scale(), s.min_scale(), rtol=1e-12, atol=0)
        torch.testing.assert_close(other.scale_noise(eps), s.scale_noise(eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([0.5, 0.0]),
        torch.tensor([0.5, -1.0]),
        torch.tensor([0.5, float("nan")]),
        torch.tensor([[0.5]]),
        torch.tensor(0.5),
    ],
)
def test_isotropic_rejects_bad_sigma(bad):
    with pytest.raises(RDDRSError) as err:
        Isotropic(bad, 3)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- gradients
def test_isotropic_gradients_match_autograd():
    sigma = torch.tensor([0.3, 1.7], dtype=F64, requires_grad=True)
    s = Isotropic(sigma.detach(), 6)
    (gp,) = torch.autograd.grad(sigma.sum(), sigma)  # P = sigma, K = sigma
    torch.testing.assert_close(s.grad_proxy(), gp)
    torch.testing.assert_close(s.grad_min_scale(), gp)


def test_diagonal_gradients_match_autograd():
    b, d = 3, 6
    theta = 0.2 + torch.rand(b, d, generator=_gen(20), dtype=F64)  # distinct entries a.s.
    s = Diagonal(theta)
    t = theta.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(torch.exp(t.log().mean(-1)).sum(), t)
    (gk,) = torch.autograd.grad(t.amin(-1).sum(), t)
    torch.testing.assert_close(s.grad_proxy(), gp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s.grad_min_scale(), gk, rtol=0, atol=0)
    # Euclidean geometry: the ascent direction is the gradient itself, a step adds it
    g = torch.randn(b, d, generator=_gen(21), dtype=F64)
    torch.testing.assert_close(s.ascent_direction(g), g)
    torch.testing.assert_close(s.step(0.01 * g).matrix(), torch.diag_embed(theta + 0.01 * g))


def _full_case(seed: int, b: int = 3, d: int = 5):
    gen = _gen(seed)
    # lambda_min well separated from the rest, so that it is differentiable
    w = torch.cat(
        [0.3 + 0.1 * torch.rand(b, 1, generator=gen, dtype=F64), 1.0 + torch.rand(b, d - 1, generator=gen, dtype=F64)],
        1,
    )
    c, _ = _spd_with_eigenvalues(w, gen)
    a = torch.randn(b, d, d, generator=gen, dtype=F64)
    v = 0.5 * (a + a.transpose(-1, -2))
    return c, v


def _proxy_of(c):
    return torch.exp(torch.linalg.eigvalsh(c).log().mean(-1))


def _min_eig_of(c):
    return torch.linalg.eigvalsh(c)[..., 0]


@pytest.mark.parametrize("which", ["proxy", "min_scale"])
def test_full_riemannian_gradients_by_finite_differences(which):
    """inner(C, grad f, V) == d/dt f(Exp_C(t V)) at t = 0 for symmetric V."""
    c, v = _full_case(30)
    s = FullSPD(c)
    grad, f = (s.grad_proxy(), _proxy_of) if which == "proxy" else (s.grad_min_scale(), _min_eig_of)
    # the closed form grad P = (P/d) C (the module docstring above)
    if which == "proxy":
        torch.testing.assert_close(grad, (_proxy_of(c) / 5)[:, None, None] * c, rtol=1e-10, atol=1e-12)
    h = 1e-5
    fd = (f(spd.exp(c, h * v)) - f(spd.exp(c, -h * v))) / (2 * h)
    torch.testing.assert_close(spd.inner(c, grad, v), fd, rtol=1e-6, atol=1e-9)
    assert (fd.abs() > 1e-3).all()  # the check is not vacuous


def test_full_ascent_direction_is_the_riemannian_gradient():
    """inner(C, ascent(G), V) == <G, V>_F: the directional derivative of a Euclidean gradient G."""
    c, v = _full_case(31)
    s = FullSPD(c)
    g = torch.randn(c.shape, generator=_gen(32), dtype=F64)  # not symmetric on purpose
    rg = s.ascent_direction(g)
    torch.testing.assert_close(rg, rg.transpose(-1, -2))
    torch.testing.assert_close(spd.inner(c, rg, v), (g * v).sum((-1, -2)), rtol=1e-10, atol=1e-12)
    # a step follows the exponential map and stays SPD
    stepped = s.step(0.1 * v)
    torch.testing.assert_close(stepped.matrix(), spd.exp(c, 0.1 * v), rtol=1e-10, atol=1e-12)
    assert (torch.linalg.eigvalsh(stepped.matrix()) > 0).all()


# --------------------------------------------------------------------------- NoiseSource
def test_noise_same_key_same_draws_whatever_the_batching():
    d, m = 4, 6
    together = NoiseSource(5, NoiseSource.ESTIMATE).draw([3, 1, 2], m, d, F64)
    assert together.shape == (3, m, d) and together.dtype == F64
    for row, i in enumerate([3, 1, 2]):
        alone = NoiseSource(5, NoiseSource.ESTIMATE).draw([i], m, d, F64)
        torch.testing.assert_close(together[row], alone[0], rtol=0, atol=0)
    reordered = NoiseSource(5, NoiseSource.ESTIMATE).draw([2, 3], m, d, F64)
    torch.testing.assert_close(reordered, together[[2, 0]], rtol=0, atol=0)


def test_noise_streams_differ_by_stage_seed_and_index():
    d, m = 3, 8
    draws = {
        (seed, stage): NoiseSource(seed, stage).draw([0, 1], m, d)
        for seed in (0, 1)
        for stage in (NoiseSource.OPTIMIZE, NoiseSource.SELECT, NoiseSource.ESTIMATE)
    }
    keys = list(draws)
    for i, ka in enumerate(keys):
        assert not torch.equal(draws[ka][0], draws[ka][1])  # indices
        for kb in keys[i + 1 :]:
            assert not torch.allclose(draws[ka], draws[kb])


def test_noise_draws_continue_the_stream():
    src = NoiseSource(0, NoiseSource.SELECT)
    first, second = src.draw([7], 5, 3), src.draw([7], 5, 3)
    assert not torch.allclose(first, second)
    # ... and look standard normal
    big = NoiseSource(1, NoiseSource.SELECT).draw([0], 20_000, 2, F64)
    assert abs(float(big.mean())) < 0.03 and abs(float(big.var()) - 1) < 0.03


@pytest.mark.parametrize("chunks", [(7, 13), (1,) * 20, (16, 4)])
def test_noise_draws_do_not_depend_on_chunking(chunks):
    """Drawing m1 then m2 rows continues the stream exactly as one draw of m1 + m2 rows.

    Otherwise the noise of an input depends on ``batch_size`` (sample_counts draws in chunks)
    and on how many inputs share a batch.
    """
    whole = NoiseSource(0, NoiseSource.ESTIMATE).draw([4], sum(chunks), 5, F64)
    src = NoiseSource(0, NoiseSource.ESTIMATE)
    pieces = torch.cat([src.draw([4], c, 5, F64) for c in chunks], 1)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)


def test_noise_rotation():
    d = 6
    u = _orthogonal(1, d, _gen(40))[0]
    plain = NoiseSource(3, NoiseSource.OPTIMIZE).draw([0, 5], 9, d, F64)
    rotated = NoiseSource(3, NoiseSource.OPTIMIZE, rotation=u).draw([0, 5], 9, d, F64)
    torch.testing.assert_close(rotated, plain @ u.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(rotated, plain)


def test_noise_unknown_stage():
    with pytest.raises(RDDRSError) as err:
        NoiseSource(0, "certify")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- memory bound
@pytest.mark.parametrize("b, num, batch_size", [(3, 50, 2), (6, 10, 7), (5, 100, 32), (2, 9, 1), (4, 3, 1000)])
def test_sample_counts_respects_batch_size(b, num, batch_size):
    d = 3
    x = torch.randn(b, d, generator=_gen(50), dtype=F64)
    s, _, _ = _make("diagonal", b=b, d=d, seed=51)
    rows = []

    def model(z):
        rows.append(z.shape[0])
        return torch.stack([torch.zeros(len(z), dtype=z.dtype), z[:, 0], -z[:, 0]], 1)

    counts = sample_counts(
        model, x, s, list(range(b)), num, NoiseSource(0, NoiseSource.ESTIMATE), batch_size=batch_size
    )
    assert max(rows) <= batch_size
    assert sum(rows) == b * num
    assert counts.shape == (b, 3)
    assert counts.sum(1).tolist() == [num] * b
