"""The step rules against independent implementations: torch's Adam for the flat families,
geoopt's RiemannianAdam (and geomstats' parallel transport) for a full S."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import F64, generator, raises_one_line, scale_matrix

from rddrs.core import spd, steps
from rddrs.core.noise import Diagonal, FullSPD, Isotropic

torch.set_num_threads(1)


def _gradients(shape, count, seed):
    gen = generator(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) * (1 + t) for t in range(count)]


@pytest.mark.parametrize("family", ["isotropic", "diagonal"])
def test_flat_adam_is_torch_adam_maximising(family):
    """Step for step on one gradient sequence; a missing bias correction or a wrong sign fails."""
    gen = generator(0)
    param = 0.5 + torch.rand((3,) if family == "isotropic" else (3, 5), generator=gen, dtype=F64)
    law = Isotropic(param.clone(), 5) if family == "isotropic" else Diagonal(param.clone())
    reference = param.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.03, maximize=True)
    rule = steps.make("adam", 0.03)
    for grad in _gradients(param.shape, 12, seed=1):
        law = rule(law, grad)
        reference.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(law.param, reference.detach(), rtol=1e-12, atol=1e-14)


def test_sgd_is_a_plain_step():
    law = Diagonal(torch.full((2, 4), 0.5, dtype=F64))
    grad = torch.randn(2, 4, generator=generator(2), dtype=F64)
    torch.testing.assert_close(steps.make("sgd", 0.1)(law, grad).param, 0.5 + 0.1 * grad)


def _spd_gradient(c, target):
    """Riemannian gradient of the smooth function -||C - T||_F^2 / 2 (Euclidean gradient T - C)."""
    return spd.riemannian_gradient(c, target - c)


def test_riemannian_adam_is_geoopts_with_the_exponential_map():
    geoopt = pytest.importorskip("geoopt")
    d, lr = 4, 0.05
    c0 = torch.stack([scale_matrix("full", d, seed) for seed in (3, 4)])
    target = torch.stack([scale_matrix("full", d, seed) for seed in (5, 6)])
    manifold = geoopt.SymmetricPositiveDefinite()
    manifold.retr = manifold.expmap  # geoopt retracts with a second-order approximation; we step with Exp
    point = geoopt.ManifoldParameter(c0.clone(), manifold=manifold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = geoopt.optim.RiemannianAdam([point], lr=lr)
    law, rule = FullSPD(c0.clone()), steps.make("adam", lr)
    for _ in range(15):
        # geoopt minimises and converts Euclidean gradients itself: hand it minus the Euclidean gradient
        point.grad = -(target - point.detach())
        optimizer.step()
        law = rule(law, _spd_gradient(law.param, target))
        torch.testing.assert_close(law.param, point.detach(), rtol=1e-9, atol=1e-10)
    # and it went somewhere: the iterates approach the target
    assert (spd.distance(law.param, target) < 0.9 * spd.distance(c0, target)).all()


def test_riemannian_adam_keeps_one_second_moment_per_input():
    """The first step of Adam has metric norm lr, whatever the scale of the gradient."""
    c = torch.stack([scale_matrix("full", 5, seed) for seed in (7, 8)])
    law = FullSPD(c)
    g = spd.sym(torch.randn(2, 5, 5, generator=generator(9), dtype=F64)) * torch.tensor([1e-3, 1e3], dtype=F64).view(
        2, 1, 1
    )
    rule = steps.make("adam", 0.1)
    moved = rule(law, spd.riemannian_gradient(c, g))
    length = spd.distance(c, moved.param)
    torch.testing.assert_close(length, torch.full((2,), 0.1, dtype=F64), rtol=1e-4, atol=0)  # eps = 1e-8 aside


_GEOMSTATS_TRANSPORT = """
import json, sys
import numpy as np
from geomstats.geometry.spd_matrices import SPDAffineMetric, SPDMatrices
c, x, u = (np.array(a) for a in json.loads(sys.stdin.read()))
space = SPDMatrices(len(c), equip=False)
space.equip_with_metric(SPDAffineMetric)
print(json.dumps(space.metric.parallel_transport(u, c, direction=x).tolist()))
"""


def _transport(c, d, u):
    """The reference: parallel transport of the tangent vector U at C to D along the geodesic from
    C to D, ``E U E^T`` with ``E = C^1/2 (C^-1/2 D C^-1/2)^1/2 C^-1/2``, from D itself (where
    ``spd.exp_transport`` forms E from the factors of the step that reaches D)."""
    root, inv_root = spd.sqrt_and_inv_sqrt(c)
    e = root @ spd.funm(inv_root @ d @ inv_root, torch.sqrt) @ inv_root
    return spd.sym(e @ u @ e.transpose(-1, -2))


def test_exp_transport_is_parallel_transport():
    pytest.importorskip("geomstats")
    d = 5
    c, d_point = scale_matrix("full", d, 10), scale_matrix("full", d, 11)
    x = spd.log(c, d_point)
    u = spd.sym(torch.randn(d, d, generator=generator(12), dtype=F64))
    moved, carried = spd.exp_transport(c, x, u)
    torch.testing.assert_close(moved, d_point, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(carried, _transport(c, d_point, u), rtol=1e-9, atol=1e-10)
    # geomstats (numpy backend, in its own process: its import changes global state)
    proc = subprocess.run(
        [sys.executable, "-c", _GEOMSTATS_TRANSPORT],
        capture_output=True,
        text=True,
        check=True,
        input=json.dumps([c.tolist(), x.tolist(), u.tolist()]),
        env=dict(os.environ, GEOMSTATS_BACKEND="numpy"),
    )
    expected = torch.as_tensor(np.array(json.loads(proc.stdout.splitlines()[-1])))
    torch.testing.assert_close(carried, expected, rtol=1e-8, atol=1e-9)
    # parallel transport keeps the metric: g_D(carried, carried) = g_C(u, u)
    torch.testing.assert_close(spd.inner(d_point, carried, carried), spd.inner(c, u, u), rtol=1e-9, atol=0)


def test_bounded_transport_follows_the_shortened_step():
    c = scale_matrix("full", 4, 13)
    x = 5.0 * spd.sym(torch.randn(4, 4, generator=generator(14), dtype=F64))
    u = spd.sym(torch.randn(4, 4, generator=generator(15), dtype=F64))
    moved, carried = spd.exp_transport(c, x, u, max_norm=0.1)
    torch.testing.assert_close(moved, spd.exp(c, x, max_norm=0.1))
    torch.testing.assert_close(carried, _transport(c, moved, u), rtol=1e-9, atol=1e-10)


def test_unknown_rule_is_a_one_line_error():
    assert "step rule" in raises_one_line(steps.make, "rmsprop", 0.1)


def test_every_step_name_a_search_may_give_has_its_rule():
    from rddrs.core.presets import STEPS

    assert tuple(steps.RULES) == STEPS
    assert all(isinstance(steps.make(name, 0.1), steps.RULES[name]) for name in STEPS)
    assert "unknown step rule" in raises_one_line(steps.make, "momentum", 0.1)
