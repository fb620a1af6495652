"""Tests of ``rddrs.core.spd``: affine-invariant geometry on symmetric positive definite matrices.

Conventions under test (``rddrs.core.spd``'s module docstring):
``g_C(A, B) = tr(C^-1 A C^-1 B)``, ``Exp_C(X) = C^1/2 expm(C^-1/2 X C^-1/2) C^1/2``,
``Log_C = Exp_C^-1``, ``dist(C, D) = ||logm(C^-1/2 D C^-1/2)||_F``, Riemannian gradient
``C sym(G) C``.

Reference values come from geomstats 2.8 (run in a subprocess: importing geomstats with the
pytorch backend sets torch's default dtype to float64 for the whole process), from closed
forms (commuting matrices, the base point I) and from identities of the metric (congruence
invariance, exp/log inverse, geodesics, the defining property of the gradient). Random
inputs come from local ``torch.Generator``s; the global RNG is never touched.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rddrs import RDDRSError
from rddrs.core import spd

# MKL's threaded eigensolver collapses when the two cores are shared with another process.
torch.set_num_threads(1)

F32 = torch.float32
F64 = torch.float64


# --------------------------------------------------------------------------- helpers
# Random inputs come from spd.random_spd / spd.random_orthogonal (the one sampler of the book and
# the tests); the references below are built from torch.linalg directly (not from spd) so that
# they are independent.


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symm(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def random_sym(gen, *batch: int, d: int, norm: float = 1.0, dtype=F64) -> torch.Tensor:
    """Random symmetric matrix with Frobenius norm ``norm`` (per batch element)."""
    s = _symm(torch.randn(*batch, d, d, generator=gen, dtype=F64))
    s = s / torch.linalg.matrix_norm(s).unsqueeze(-1).unsqueeze(-1) * norm
    return s.to(dtype)


def ref_sqrt(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return _symm(v @ torch.diag_embed(w.sqrt()) @ v.transpose(-1, -2))


def random_tangent(gen, c: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """Symmetric ``X = C^1/2 S C^1/2`` with ``||S||_F = norm``, so that ``g_C(X, X) = norm^2``."""
    r = ref_sqrt(c.to(F64))
    s = random_sym(gen, *c.shape[:-2], d=c.shape[-1], norm=norm)
    return _symm(r @ s @ r).to(c.dtype)


def random_invertible(gen, *batch: int, d: int, spread: float = 1.0) -> torch.Tensor:
    """``Q1 diag(+-exp(u)) Q2``: invertible, condition number <= e^(2 spread), either det sign."""
    q1 = spd.random_orthogonal(d, batch=tuple(batch), generator=gen)
    q2 = spd.random_orthogonal(d, batch=tuple(batch), generator=gen)
    u = (2 * torch.rand(*batch, d, generator=gen, dtype=F64) - 1) * spread
    sign = torch.where(torch.rand(*batch, d, generator=gen, dtype=F64) < 0.5, -1.0, 1.0)
    return q1 @ torch.diag_embed(sign * u.exp()) @ q2


def ref_inner(c, a, b):
    """``tr(C^-1 A C^-1 B)`` through linear solves."""
    ca = torch.linalg.solve(c, a)
    cb = torch.linalg.solve(c, b)
    return torch.diagonal(ca @ cb, dim1=-2, dim2=-1).sum(-1)


def congruence(a, c):
    return _symm(a @ c @ a.transpose(-1, -2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative Frobenius error over the batch."""
    num = torch.linalg.matrix_norm((a - b).to(F64)) if a.dim() >= 2 else (a - b).abs().to(F64)
    den = torch.linalg.matrix_norm(b.to(F64)) if b.dim() >= 2 else b.abs().to(F64)
    return (num / den.clamp_min(1e-300)).max().item()


def metric_err(c, a, b) -> float:
    """Largest ``||A - B||_C / ||B||_C`` over the batch (error measured in the metric at C)."""
    diff = a.to(F64) - b.to(F64)
    c = c.to(F64)
    b = b.to(F64)
    # clamp: tr((C^-1 E)^2) of a rounding-level E can come out as -1e-32
    err = ref_inner(c, diff, diff).clamp_min(0).sqrt() / ref_inner(c, b, b).sqrt()
    assert not err.isnan().any()
    return err.max().item()


# --------------------------------------------------------------------------- 1. geomstats

GEOMSTATS_DIMS = [2, 10, 50, 784]
GEOMSTATS_BATCH = {2: 6, 10: 4, 50: 3, 784: None}  # None: one unbatched matrix

GEOMSTATS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import geomstats._backend as backend
    from geomstats.geometry.spd_matrices import SPDMatrices, SPDAffineMetric

    torch.set_num_threads(1)
    assert backend.BACKEND_NAME == "pytorch", backend.BACKEND_NAME
    data = np.load(sys.argv[1])
    out = {}
    for d in data["dims"].tolist():
        c, p, x, y = (torch.from_numpy(data[f"{d}_{k}"]) for k in "CDXY")
        space = SPDMatrices(d, equip=False)
        space.equip_with_metric(SPDAffineMetric)
        metric = space.metric
        assert type(metric) is SPDAffineMetric
        out[f"{d}_exp"] = metric.exp(x, c).numpy()
        out[f"{d}_log"] = metric.log(p, c).numpy()
        out[f"{d}_dist"] = np.asarray(metric.dist(c, p).numpy())
        out[f"{d}_inner"] = np.asarray(metric.inner_product(x, y, c).numpy())
    np.savez(sys.argv[2], **out)
    """
)


@pytest.fixture(scope="module")
def geomstats_cases(tmp_path_factory):
    """Inputs per dimension and geomstats' exp, log, dist and inner on them (one subprocess)."""
    if importlib.util.find_spec("geomstats") is None:
        pytest.skip("geomstats is not installed")
    gen = _gen(20240601)
    inputs: dict[str, np.ndarray] = {"dims": np.array(GEOMSTATS_DIMS)}
    cases = {}
    for d in GEOMSTATS_DIMS:
        batch = () if GEOMSTATS_BATCH[d] is None else (GEOMSTATS_BATCH[d],)
        c = spd.random_spd(d, batch=tuple(batch), spread=1.0, generator=gen)
        p = spd.random_spd(d, batch=tuple(batch), spread=1.0, generator=gen)
        x = random_tangent(gen, c, norm=1.5)
        y = random_tangent(gen, c, norm=0.7)
        cases[d] = dict(C=c, D=p, X=x, Y=y)
        for k, v in cases[d].items():
            inputs[f"{d}_{k}"] = v.numpy()
    folder = tmp_path_factory.mktemp("geomstats")
    src, dst = folder / "inputs.npz", folder / "outputs.npz"
    np.savez(src, **inputs)
    script = folder / "run_geomstats.py"
    script.write_text(GEOMSTATS_SCRIPT)
    env = dict(os.environ, GEOMSTATS_BACKEND="pytorch", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    dtype_before = torch.get_default_dtype()
    proc = subprocess.run(
        [sys.executable, str(script), str(src), str(dst)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torch.get_default_dtype() == dtype_before  # geomstats never ran in this process
    if proc.returncode != 0:
        pytest.fail(f"geomstats subprocess failed:\n{proc.stderr[-4000:]}")
    with np.load(dst) as out:
        results = {k: torch.from_numpy(out[k]) for k in out.files}
    return cases, results


@pytest.mark.parametrize("d", GEOMSTATS_DIMS)
def test_exp_matches_geomstats(geomstats_cases, d):
    cases, ref = geomstats_cases
    c, x = cases[d]["C"], cases[d]["X"]
    got = spd.exp(c, x)
    assert got.shape == c.shape and got.dtype == F64
    assert rel_err(got, ref[f"{d}_exp"]) < 1e-10


@pytest.mark.parametrize("d", GEOMSTATS_DIMS)
def test_log_matches_geomstats(geomstats_cases, d):
    cases, ref = geomstats_cases
    c, p = cases[d]["C"], cases[d]["D"]
    got = spd.log(c, p)
    assert got.shape == c.shape and got.dtype == F64
    assert metric_err(c, got, ref[f"{d}_log"]) < 1e-9


@pytest.mark.parametrize("d", GEOMSTATS_DIMS)
def test_distance_matches_geomstats(geomstats_cases, d):
    cases, ref = geomstats_cases
    c, p = cases[d]["C"], cases[d]["D"]
    got = spd.distance(c, p)
    expected = ref[f"{d}_dist"]
    assert got.shape == c.shape[:-2] == expected.shape
    assert (expected > 0.1).all()  # distinct points: a distance stuck at 0 cannot pass
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("d", GEOMSTATS_DIMS)
def test_inner_matches_geomstats(geomstats_cases, d):
    cases, ref = geomstats_cases
    c, x, y = cases[d]["C"], cases[d]["X"], cases[d]["Y"]
    got = spd.inner(c, x, y)
    expected = ref[f"{d}_inner"]
    assert got.shape == c.shape[:-2] == expected.shape
    # |g(X, Y)| <= ||X|| ||Y|| = 1.5 * 0.7: compare on that scale (g(X, Y) itself may be near 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * 1.5 * 0.7)


# --------------------------------------------------------------------------- 2. identities

DIMS = [2, 10, 50]


@pytest.mark.parametrize("d", DIMS)
def test_distance_closed_form_for_commuting_matrices(d):
    """For C = Q diag(a) Q^T, D = Q diag(b) Q^T: dist = ||log(b / a)||_2; and dist(I, D) = ||log eig D||."""
    gen = _gen(1)
    q = spd.random_orthogonal(d, batch=(3,), generator=gen)
    a = torch.exp(torch.randn(3, d, generator=gen, dtype=F64))
    b = torch.exp(torch.randn(3, d, generator=gen, dtype=F64))
    c = _symm(q @ torch.diag_embed(a) @ q.transpose(-1, -2))
    p = _symm(q @ torch.diag_embed(b) @ q.transpose(-1, -2))
    torch.testing.assert_close(spd.distance(c, p), torch.log(b / a).norm(dim=-1), rtol=1e-11, atol=0)
    eye = torch.eye(d, dtype=F64).expand(3, d, d)
    torch.testing.assert_close(spd.distance(eye, p), torch.log(b).norm(dim=-1), rtol=1e-11, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_exp_and_log_at_identity_are_matrix_exp_and_log(d):
    gen = _gen(2)
    eye = torch.eye(d, dtype=F64).expand(4, d, d)
    x = random_sym(gen, 4, d=d, norm=2.0)
    assert rel_err(spd.exp(eye, x), torch.linalg.matrix_exp(x)) < 1e-12
    p = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    w, v = torch.linalg.eigh(p)
    logm = v @ torch.diag_embed(w.log()) @ v.transpose(-1, -2)
    assert rel_err(spd.log(eye, p), logm) < 1e-11
    assert rel_err(torch.linalg.matrix_exp(spd.log(eye, p)), p) < 1e-11


@pytest.mark.parametrize("d", DIMS)
def test_distance_is_congruence_invariant(d):
    gen = _gen(3)
    y = spd.random_spd(d, batch=(5,), spread=1.0, generator=gen)
    z = spd.random_spd(d, batch=(5,), spread=1.0, generator=gen)
    a = random_invertible(gen, 5, d=d, spread=1.0)
    dist = spd.distance(y, z)
    assert (dist > 0.1).all()
    torch.testing.assert_close(spd.distance(congruence(a, y), congruence(a, z)), dist, rtol=1e-10, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_distance_is_inversion_invariant(d):
    gen = _gen(4)
    y = spd.random_spd(d, batch=(5,), spread=1.0, generator=gen)
    z = spd.random_spd(d, batch=(5,), spread=1.0, generator=gen)
    yi, zi = _symm(torch.linalg.inv(y)), _symm(torch.linalg.inv(z))
    torch.testing.assert_close(spd.distance(yi, zi), spd.distance(y, z), rtol=1e-10, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_distance_symmetric_and_zero_on_identical_points(d):
    gen = _gen(5)
    y = spd.random_spd(d, batch=(6,), spread=1.5, generator=gen)
    z = spd.random_spd(d, batch=(6,), spread=1.5, generator=gen)
    dyz, dzy = spd.distance(y, z), spd.distance(z, y)
    assert (dyz > 0.1).all()
    torch.testing.assert_close(dyz, dzy, rtol=1e-10, atol=0)
    assert spd.distance(y, y).abs().max().item() < 1e-10
    assert spd.distance(y, y.clone()).abs().max().item() < 1e-10


@pytest.mark.parametrize("d", DIMS)
def test_distance_triangle_inequality(d):
    gen = _gen(6)
    a, b, c = (spd.random_spd(d, batch=(20,), spread=1.5, generator=gen) for _ in range(3))
    assert (spd.distance(a, c) <= spd.distance(a, b) + spd.distance(b, c) + 1e-10).all()


@pytest.mark.parametrize("d", DIMS)
def test_log_inverts_exp(d):
    gen = _gen(7)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    x = random_tangent(gen, c, norm=2.0)
    back = spd.log(c, spd.exp(c, x))
    assert metric_err(c, back, x) < 1e-10


@pytest.mark.parametrize("d", DIMS)
def test_exp_inverts_log(d):
    gen = _gen(8)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    p = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    assert rel_err(spd.exp(c, spd.log(c, p)), p) < 1e-10


@pytest.mark.parametrize("d", DIMS)
def test_distance_equals_norm_of_tangent(d):
    gen = _gen(9)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    x = random_tangent(gen, c, norm=1.7)
    norm = spd.inner(c, x, x).sqrt()
    torch.testing.assert_close(norm, torch.full_like(norm, 1.7), rtol=1e-12, atol=0)
    torch.testing.assert_close(spd.distance(c, spd.exp(c, x)), norm, rtol=1e-10, atol=0)
    # and the norm of Log is the distance
    p = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    v = spd.log(c, p)
    torch.testing.assert_close(spd.inner(c, v, v).sqrt(), spd.distance(c, p), rtol=1e-10, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_exp_is_congruence_equivariant(d):
    gen = _gen(10)
    c = spd.random_spd(d, batch=(4,), spread=1.0, generator=gen)
    x = random_tangent(gen, c, norm=1.5)
    a = random_invertible(gen, 4, d=d, spread=1.0)
    lhs = spd.exp(congruence(a, c), congruence(a, x))
    rhs = congruence(a, spd.exp(c, x))
    assert rel_err(lhs, rhs) < 1e-10
    # same for log
    p = spd.random_spd(d, batch=(4,), spread=1.0, generator=gen)
    lhs = spd.log(congruence(a, c), congruence(a, p))
    rhs = congruence(a, spd.log(c, p))
    assert metric_err(congruence(a, c), lhs, rhs) < 1e-10


@pytest.mark.parametrize("d", DIMS)
def test_geodesic_has_constant_speed(d):
    """Along t -> Exp_C(tX): dist(gamma(s), gamma(t)) = |t - s| ||X||_C."""
    gen = _gen(11)
    c = spd.random_spd(d, batch=(3,), spread=1.0, generator=gen)
    x = random_tangent(gen, c, norm=1.3)
    norm = spd.inner(c, x, x).sqrt()
    ts = [-1.5, -0.25, 0.0, 0.5, 2.0]
    points = {t: spd.exp(c, t * x) for t in ts}
    assert rel_err(points[0.0], c) < 1e-12
    for t in ts:
        torch.testing.assert_close(spd.distance(c, points[t]), abs(t) * norm, rtol=1e-10, atol=1e-10)
        for s in ts:
            torch.testing.assert_close(spd.distance(points[s], points[t]), abs(t - s) * norm, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", DIMS)
def test_inner_matches_trace_formula_and_is_invariant(d):
    gen = _gen(12)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    x, y = random_sym(gen, 4, d=d), random_sym(gen, 4, d=d)
    g = spd.inner(c, x, y)
    torch.testing.assert_close(g, ref_inner(c, x, y), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spd.inner(c, y, x), g, rtol=1e-10, atol=1e-12)
    assert (spd.inner(c, x, x) > 0).all()
    a = random_invertible(gen, 4, d=d, spread=1.0)
    torch.testing.assert_close(
        spd.inner(congruence(a, c), congruence(a, x), congruence(a, y)), g, rtol=1e-9, atol=1e-11
    )


@pytest.mark.parametrize("d", DIMS)
def test_sqrt_and_inv_sqrt(d):
    gen = _gen(13)
    c = spd.random_spd(d, batch=(4,), spread=2.0, generator=gen)
    root, inv_root = spd.sqrt_and_inv_sqrt(c)
    eye = torch.eye(d, dtype=F64).expand_as(c)
    assert rel_err(root @ root, c) < 1e-12
    assert rel_err(root @ inv_root, eye) < 1e-12
    assert rel_err(root, root.transpose(-1, -2)) < 1e-14
    assert (torch.linalg.eigvalsh(_symm(root)) > 0).all()  # the SPD square root, not another one


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_exp_and_log_return_exactly_symmetric_matrices(dtype):
    """Points and tangent vectors are symmetrised, not just symmetric up to rounding.

    Downstream code may test ``torch.equal(C, C.mT)`` or feed C to a Cholesky factorisation
    that reads one triangle; a C that drifts from symmetry over many steps would break that.
    """
    gen = _gen(31)
    c = spd.random_spd(20, batch=(4,), spread=1.5, dtype=dtype, generator=gen)
    p = spd.random_spd(20, batch=(4,), spread=1.5, dtype=dtype, generator=gen)
    x = random_tangent(gen, c, norm=1.0)
    a = random_invertible(gen, 4, d=20, spread=1.0).to(dtype)
    x_rounded = a @ x @ a.transpose(-1, -2)  # symmetric only up to rounding
    c_rounded = a @ c @ a.transpose(-1, -2)
    assert not torch.equal(x_rounded, x_rounded.transpose(-1, -2))
    for out in (spd.exp(c, x), spd.exp(c_rounded, x_rounded), spd.log(c, p), spd.log(c_rounded, p)):
        assert out.dtype == dtype
        assert torch.equal(out, out.transpose(-1, -2))


# Riemannian gradient: g_C(grad f, X) = d/dt f(Exp_C(tX)) at t = 0 for every symmetric X.


def _f_logdet(c, m):
    return torch.logdet(c)


def _f_trace(c, m):
    return (m * c.transpose(-1, -2)).sum((-1, -2))  # tr(M C), M not symmetric


def _f_det_root(c, m):
    return torch.linalg.det(c) ** (1.0 / c.shape[-1])


def _f_quadratic(c, m):
    mc = m @ c
    return (mc * mc.transpose(-1, -2)).sum((-1, -2)) + torch.logdet(c + c @ c)  # nonlinear


@pytest.mark.parametrize("f", [_f_logdet, _f_trace, _f_det_root, _f_quadratic], ids=lambda f: f.__name__[3:])
@pytest.mark.parametrize("d", [2, 10])
def test_riemannian_gradient_defining_property(f, d):
    gen = _gen(14)
    c = spd.random_spd(d, batch=(3,), spread=1.0, generator=gen)
    m = torch.randn(3, d, d, generator=gen, dtype=F64)
    leaf = c.clone().requires_grad_(True)
    (euclid,) = torch.autograd.grad(f(leaf, m).sum(), leaf)
    grad = spd.riemannian_gradient(c, euclid)
    assert rel_err(grad, grad.transpose(-1, -2)) < 1e-14
    h = 1e-4
    for _ in range(3):
        x = random_sym(gen, 3, d=d, norm=1.0)
        lhs = spd.inner(c, grad, x)
        # Euclidean directional derivative <G, X> for symmetric X
        torch.testing.assert_close(lhs, (euclid * x).sum((-1, -2)), rtol=1e-10, atol=1e-12)
        fd = (f(spd.exp(c, h * x), m) - f(spd.exp(c, -h * x), m)) / (2 * h)
        torch.testing.assert_close(lhs, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("d", DIMS)
def test_riemannian_gradient_of_logdet_is_c(d):
    """f = log det C: Euclidean gradient C^-1, Riemannian gradient C (identity once whitened)."""
    gen = _gen(15)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    grad = spd.riemannian_gradient(c, torch.linalg.inv(c))
    assert rel_err(grad, c) < 1e-12
    root_inv = torch.linalg.inv(ref_sqrt(c))
    assert rel_err(root_inv @ grad @ root_inv, torch.eye(d, dtype=F64).expand_as(c)) < 1e-11


@pytest.mark.parametrize("d", DIMS)
def test_riemannian_gradient_of_trace(d):
    """f = tr(M C): g_C(grad f, X) = tr(M X) for every symmetric X, even for non-symmetric M."""
    gen = _gen(16)
    c = spd.random_spd(d, batch=(4,), spread=1.5, generator=gen)
    m = torch.randn(4, d, d, generator=gen, dtype=F64)
    grad = spd.riemannian_gradient(c, m.transpose(-1, -2))
    for _ in range(3):
        x = random_sym(gen, 4, d=d)
        tr_mx = torch.diagonal(m @ x, dim1=-2, dim2=-1).sum(-1)
        torch.testing.assert_close(spd.inner(c, grad, x), tr_mx, rtol=1e-10, atol=1e-12)
        h = 1e-4
        fd = (_f_trace(spd.exp(c, h * x), m) - _f_trace(spd.exp(c, -h * x), m)) / (2 * h)
        torch.testing.assert_close(fd, tr_mx, rtol=1e-6, atol=1e-8)


def test_riemannian_gradient_of_det_root_is_p_over_d_times_c():
    """P = det(C)^(1/d) has Riemannian gradient (P / d) C: its Euclidean gradient (P / d) C^-1
    turned by ``C sym(G) C`` (the closed form of ``rddrs.core.noise.FullSPD.grad_proxy``)."""
    gen = _gen(17)
    d = 10
    c = spd.random_spd(d, batch=(4,), spread=1.0, generator=gen)
    p = torch.linalg.det(c) ** (1.0 / d)
    euclid = (p / d)[:, None, None] * torch.linalg.inv(c)
    expected = (p / d)[:, None, None] * c
    assert rel_err(spd.riemannian_gradient(c, euclid), expected) < 1e-12


def test_funm_matches_eigendecomposition_and_sym_from_eig():
    gen = _gen(18)
    c = spd.random_spd(8, batch=(3,), spread=1.0, generator=gen)
    torch.testing.assert_close(spd.funm(c, torch.exp), torch.linalg.matrix_exp(c), rtol=1e-12, atol=1e-12)
    a = torch.randn(3, 8, 8, generator=gen, dtype=F64)
    s = spd.sym(a)
    torch.testing.assert_close(s, s.transpose(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(s + (a - a.transpose(-1, -2)) / 2, a, rtol=1e-15, atol=1e-15)
    w, v = spd.eigh(c)
    assert (w[..., 1:] >= w[..., :-1]).all()
    torch.testing.assert_close(spd.from_eig(w, v), c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.transpose(-1, -2) @ v, torch.eye(8, dtype=F64).expand(3, 8, 8), rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- 3. batching


def _loop(fn, *args, batch_shape):
    """Apply ``fn`` to each batch element separately and stack back to ``batch_shape``."""
    flat = [a.reshape(-1, *a.shape[len(batch_shape) :]) for a in args]
    outs = [fn(*(a[i] for a in flat)) for i in range(flat[0].shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o).reshape(*batch_shape, *o[0].shape) for o in zip(*outs))
    return torch.stack(outs).reshape(*batch_shape, *outs[0].shape)


BATCH_SHAPES = [(5,), (2, 3)]


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize(
    "name",
    ["sqrt_and_inv_sqrt", "funm", "exp", "log", "distance", "inner", "riemannian_gradient", "floor"],
)
def test_batched_equals_loop(name, batch_shape):
    gen = _gen(19)
    d = 7
    c = spd.random_spd(d, batch=tuple(batch_shape), spread=1.5, generator=gen)
    p = spd.random_spd(d, batch=tuple(batch_shape), spread=1.5, generator=gen)
    x = random_tangent(gen, c, norm=1.0)
    y = random_sym(gen, *batch_shape, d=d)
    g = torch.randn(*batch_shape, d, d, generator=gen, dtype=F64)
    lower = torch.rand(batch_shape, generator=gen, dtype=F64) * 2 + 0.2
    calls = {
        "sqrt_and_inv_sqrt": (spd.sqrt_and_inv_sqrt, (c,)),
        "funm": (lambda a: spd.funm(a, torch.log), (c,)),
        "exp": (spd.exp, (c, x)),
        "log": (spd.log, (c, p)),
        "distance": (spd.distance, (c, p)),
        "inner": (spd.inner, (c, x, y)),
        "riemannian_gradient": (spd.riemannian_gradient, (c, g)),
        "floor": (spd.floor_eigenvalues, (c, lower)),
    }
    fn, args = calls[name]
    batched = fn(*args)
    looped = _loop(fn, *args, batch_shape=batch_shape)
    if not isinstance(batched, tuple):
        batched, looped = (batched,), (looped,)
    for b, lp in zip(batched, looped):
        assert b.shape == lp.shape
        assert b.shape[: len(batch_shape)] == batch_shape
        torch.testing.assert_close(b, lp, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
def test_floor_with_scalar_lower_batched_equals_loop(batch_shape):
    gen = _gen(20)
    c = spd.random_spd(6, batch=tuple(batch_shape), spread=2.0, generator=gen)
    out = spd.floor_eigenvalues(c, 1.0)
    looped = _loop(lambda a: spd.floor_eigenvalues(a, 1.0), c, batch_shape=batch_shape)
    torch.testing.assert_close(out, looped, rtol=1e-11, atol=1e-12)
    assert not torch.allclose(out, c)  # the floor was active somewhere


# --------------------------------------------------------------------------- 4. floor


def _spd_with_spectrum(gen, w: torch.Tensor):
    q = spd.random_orthogonal(w.shape[-1], batch=tuple(w.shape[:-1]), generator=gen)
    return _symm(q @ torch.diag_embed(w) @ q.transpose(-1, -2)), q


@pytest.mark.parametrize("d", [3, 20])
def test_floor_eigenvalues_scalar_lower(d):
    gen = _gen(21)
    w = torch.linspace(0.01, 2.0, d, dtype=F64).expand(4, d)
    c, q = _spd_with_spectrum(gen, w)
    lower = 0.5
    out = spd.floor_eigenvalues(c, lower)
    expected_w = torch.clamp(w, min=lower)
    assert out.shape == c.shape and out.dtype == c.dtype
    torch.testing.assert_close(out, out.transpose(-1, -2), rtol=0, atol=1e-14)
    w_out = torch.linalg.eigvalsh(out)
    assert (w_out >= lower * (1 - 1e-12)).all()
    torch.testing.assert_close(w_out, expected_w, rtol=1e-12, atol=1e-13)  # those above: unchanged
    # eigenvectors kept: out q_i = max(w_i, lower) q_i
    torch.testing.assert_close(out @ q, q * expected_w.unsqueeze(-2), rtol=1e-11, atol=1e-12)
    # the nearest matrix in Frobenius norm moves by exactly ||(lower - w)_+||
    torch.testing.assert_close(torch.linalg.matrix_norm(out - c), (expected_w - w).norm(dim=-1), rtol=1e-10, atol=1e-13)


def test_floor_eigenvalues_leaves_matrices_above_the_floor_unchanged():
    gen = _gen(22)
    c = spd.random_spd(10, batch=(5,), spread=1.0, generator=gen)  # eigenvalues >= e^-1
    lower = 0.9 * torch.exp(torch.tensor(-1.0, dtype=F64)).item()
    torch.testing.assert_close(spd.floor_eigenvalues(c, lower), c, rtol=1e-12, atol=1e-13)


def test_floor_eigenvalues_per_batch_lower():
    gen = _gen(23)
    d = 6
    w = torch.linspace(0.1, 3.0, d, dtype=F64).expand(3, d)
    c, q = _spd_with_spectrum(gen, w)
    lower = torch.tensor([0.05, 1.0, 2.5], dtype=F64)  # none active, some, almost all
    out = spd.floor_eigenvalues(c, lower)
    expected_w = torch.maximum(w, lower[:, None])
    torch.testing.assert_close(torch.linalg.eigvalsh(out), expected_w, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out @ q, q * expected_w.unsqueeze(-2), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(out[0], c[0], rtol=1e-12, atol=1e-13)
    for i in range(3):
        torch.testing.assert_close(out[i], spd.floor_eigenvalues(c[i], lower[i].item()), rtol=1e-12, atol=1e-13)
    # a 0-dim tensor works like a float
    torch.testing.assert_close(
        spd.floor_eigenvalues(c, torch.tensor(1.0, dtype=F64)), spd.floor_eigenvalues(c, 1.0), rtol=0, atol=0
    )


def test_floor_eigenvalues_float32_repeated_exp_steps():
    """100 steps C <- floor(Exp_C(X), 0.1) in float32, d = 100: always SPD and floored."""
    gen = _gen(24)
    d, lower = 100, 0.1
    c = spd.random_spd(d, spread=1.0, dtype=F32, generator=gen)
    hits = 0
    for _ in range(100):
        x = random_sym(gen, d=d, norm=2.0, dtype=F32)
        c = spd.floor_eigenvalues(spd.exp(c, x), lower)
        assert c.dtype == F32 and c.shape == (d, d)
        spd.check_spd(c)
        w_min = torch.linalg.eigvalsh(c.to(F64))[0].item()  # exact spectrum of the stored matrix
        assert w_min >= lower * (1 - 1e-4)
        hits += w_min < lower * (1 + 1e-3)
    assert hits > 80  # the floor was active in most steps, so the check above had teeth


# --------------------------------------------------------------------------- 5. check_spd


def _bad_inputs():
    gen = _gen(25)
    good = spd.random_spd(4, batch=(3,), spread=1.0, generator=gen)
    nonsym = good.clone()
    nonsym[1, 0, 3] += 0.1
    indefinite = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=F64))
    q = spd.random_orthogonal(3, generator=gen)
    indefinite_rot = _symm(q @ indefinite @ q.T)
    negative = -good
    singular = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=F64))
    zero = torch.zeros(3, 3, dtype=F64)
    nan = good.clone()
    nan[2, 1, 1] = float("nan")
    inf = good.clone()
    inf[0, 2, 2] = float("inf")
    batch_one_bad = torch.cat([good, torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64))[None]])
    return [
        ("non-square", torch.ones(3, 4, dtype=F64), "square"),
        ("batched non-square", torch.ones(2, 3, 4, dtype=F64), "square"),
        ("vector", torch.ones(4, dtype=F64), "square"),
        ("non-symmetric", nonsym, "symmetric"),
        ("indefinite", indefinite, "positive definite"),
        ("indefinite rotated", indefinite_rot, "positive definite"),
        ("negative definite", negative, "positive definite"),
        ("singular", singular, "positive definite"),
        ("zero", zero, "positive definite"),
        ("nan", nan, "nan"),
        ("inf", inf, "infinite|nan"),
        ("one bad in batch", batch_one_bad, "positive definite"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_check_spd_rejects(case, dtype):
    _, bad, reason = case
    with pytest.raises(RDDRSError, match=f"(?i)({reason})") as info:
        spd.check_spd(bad.to(dtype), name="scale C")
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert "scale C" in message


def test_check_spd_error_is_a_value_error():
    with pytest.raises(ValueError):
        spd.check_spd(torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_check_spd_accepts_spd(dtype):
    gen = _gen(26)
    c = spd.random_spd(30, batch=(4,), spread=3.0, generator=gen).to(dtype)
    spd.check_spd(c)
    spd.check_spd(c[0])
    spd.check_spd(c.reshape(2, 2, 30, 30))
    spd.check_spd(1e6 * c)  # the symmetry tolerance is relative
    spd.check_spd(1e-6 * c)
    # symmetric only up to rounding (a congruence computed without symmetrising)
    a = random_invertible(gen, 4, d=30, spread=1.0)
    a = a.to(dtype)
    rounded = a @ c @ a.transpose(-1, -2)
    assert not torch.equal(rounded, rounded.transpose(-1, -2))
    spd.check_spd(rounded)


def test_check_spd_rejects_numerically_singular():
    gen = _gen(27)
    passed = []
    for dtype in (F32, F64):
        for d in (3, 10, 50, 200):
            for _ in range(5):
                b = torch.randn(d, d - 1, generator=gen, dtype=F64)  # rank d - 1
                s = (b @ b.T).to(dtype)
                try:
                    spd.check_spd(s)
                    passed.append((str(dtype), d))
                except RDDRSError:
                    pass
    assert not passed, f"rank-deficient matrices accepted: {passed}"


# --------------------------------------------------------------------------- 6. dtype / device


def _all_outputs(c, p, x, g):
    root, inv_root = spd.sqrt_and_inv_sqrt(c)
    return {
        "sym": spd.sym(g),
        "eigh_w": spd.eigh(c)[0],
        "eigh_v": spd.eigh(c)[1],
        "funm": spd.funm(c, torch.exp),
        "sqrt": root,
        "inv_sqrt": inv_root,
        "exp": spd.exp(c, x),
        "log": spd.log(c, p),
        "distance": spd.distance(c, p),
        "inner": spd.inner(c, x, x),
        "riemannian_gradient": spd.riemannian_gradient(c, g),
        "floor_scalar": spd.floor_eigenvalues(c, 0.8),
        "floor_tensor": spd.floor_eigenvalues(c, torch.tensor([0.5, 0.9, 1.2])),
    }


def _dtype_inputs(dtype, device="cpu"):
    gen = _gen(28)
    c = spd.random_spd(12, batch=(3,), spread=1.0, generator=gen)
    p = spd.random_spd(12, batch=(3,), spread=1.0, generator=gen)
    x = random_tangent(gen, c, norm=1.0)
    g = torch.randn(3, 12, 12, generator=gen, dtype=F64)
    return [t.to(device=device, dtype=dtype) for t in (c, p, x, g)]


def _check_dtype_device(dtype, device):
    outs = _all_outputs(*_dtype_inputs(dtype, device))
    ref = _all_outputs(*_dtype_inputs(F64, "cpu"))
    tol = 1e-4 if dtype == F32 else 1e-10
    for key, out in outs.items():
        assert out.dtype == dtype, key
        assert out.device.type == torch.device(device).type, key
        assert torch.isfinite(out).all(), key
        if key == "eigh_v":  # eigenvectors are defined up to sign
            continue
        torch.testing.assert_close(out.cpu().to(F64), ref[key], rtol=tol, atol=tol, msg=key)
    spd.check_spd(outs["exp"])
    spd.check_spd(outs["floor_tensor"])


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_dtype_is_kept_and_float32_is_accurate(dtype):
    _check_dtype_device(dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cuda_keeps_device_and_dtype(dtype):
    _check_dtype_device(dtype, "cuda")
    # the check that raises must work on the device too
    with pytest.raises(RDDRSError):
        spd.check_spd(-torch.eye(3, device="cuda", dtype=dtype))


def test_default_dtype_untouched():
    """Nothing in this module (geomstats included) may change torch's default dtype."""
    assert torch.get_default_dtype() == F32
