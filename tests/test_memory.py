"""Tests of ``rddrs.pipeline.memory``: exact ellipsoid geometry and the memory pass over result files.

Ground truths are independent of the code under test: brute force over dense samples of the
boundary of an ellipsoid (in d = 2 and 3), closed forms (balls, concentric ellipsoids via
the spectral norm, a crafted "hard case"), bisection on the Gilitschenski-Hanebeck test, and
orthogonal invariance. Regions are open: ``E(c, S, r) = {c + S u : ||u|| < r}``.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import raises_one_line, run_bound_by_permissions

from rddrs import RDDRSError
from rddrs.cli import main
from rddrs.core.noise import Diagonal, FullSPD, Isotropic
from rddrs.core.regions import (
    KEPT,
    RELABELLED,
    SHRUNK,
    TOUCH_TOLERANCE,
    Memory,
    Regions,
    contains,
    disjoint,
    gauges,
    largest_contained_radius,
    largest_disjoint_radius,
    separation,
)
from rddrs.core.spd import random_orthogonal
from rddrs.pipeline.memory import ABSTAINED, MEMORY_COLUMNS, apply_memory, read_memory_rows
from rddrs.pipeline.results import COLUMNS, memory_path, read_rows, traces_dir, write_rows

torch.set_num_threads(1)
F64 = torch.float64
KINDS = ["iso", "diag", "full"]


# --------------------------------------------------------------------------- helpers
def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _laws(kind: str, n: int, d: int, gen: torch.Generator):
    """n random laws of a family, scales in [0.3, 2]; full ones rotated (not axis-aligned)."""
    scales = 0.3 + 1.7 * torch.rand(n, d, generator=gen, dtype=F64)
    if kind == "iso":
        return Isotropic(scales[:, 0], dim=d)
    if kind == "diag":
        return Diagonal(scales)
    q = torch.stack([_orthogonal(d, gen) for _ in range(n)])
    return FullSPD((q * scales[:, None, :]) @ q.transpose(-1, -2))


def _sphere(d: int, m: int) -> torch.Tensor:
    """m nearly uniform unit vectors: an angle grid (d = 2) or a Fibonacci lattice (d = 3)."""
    if d == 2:
        t = torch.arange(m, dtype=F64) * (2 * math.pi / m)
        return torch.stack([t.cos(), t.sin()], 1)
    k = torch.arange(m, dtype=F64) + 0.5
    z = 1 - 2 * k / m
    phi = k * math.pi * (3 - math.sqrt(5))
    rho = (1 - z**2).sqrt()
    return torch.stack([rho * phi.cos(), rho * phi.sin(), z], 1)


def _norm_in(points, centre, scale_matrix):
    """``||S^-1 (p - c)||`` per point (its gauge in the region of that centre and scale)."""
    return torch.linalg.solve(scale_matrix, (points - centre).T).T.norm(dim=1)


def _min_on_sphere(fn, d, m=20_000, rounds=4):
    """min of fn (unit vectors (m, d) -> values (m,)) over the unit sphere: a dense lattice,
    then random points in ever smaller caps around the best one found."""
    u = _sphere(d, m)
    values = fn(u)
    best, value = u[values.argmin()], values.min()
    gen = torch.Generator().manual_seed(0)
    for spread in (0.02 / 10**k for k in range(rounds)):
        cand = best + spread * torch.randn(m // 4, d, generator=gen, dtype=F64)
        cand = torch.cat([best[None], cand / cand.norm(dim=1, keepdim=True)])
        values = fn(cand)
        best, value = cand[values.argmin()], values.min()
    return float(value)


def _brute_touching_radius(x, s, c2, s2, r2, d):
    """Distance from x to the stored region (closed) or, from inside, to its boundary, in
    the S-norm: min over the boundary points of the stored region."""
    return _min_on_sphere(lambda u: _norm_in(c2 + r2 * u @ s2.T, x, s), d)


def _brute_min_gauge(c1, s1, r1, c2, s2, r2, d):
    """min over the closed first region of the second's gauge ``||S2^-1 (p - c2)|| / r2``;
    by convexity the minimum is at c2 (if in the first region) or on the first's boundary.
    The open regions meet iff this is < 1."""
    if float(_norm_in(c2[None], c1, s1)[0]) <= r1:
        return 0.0
    return _min_on_sphere(lambda u: _norm_in(c1 + r1 * u @ s1.T, c2, s2), d) / float(r2)


def _region(centre, law, gap):
    return Regions(torch.as_tensor(centre, dtype=F64)[None], law, torch.tensor([float(gap)], dtype=F64))


def _iso(sigma, d=2):
    return Isotropic(torch.tensor([float(sigma)], dtype=F64), dim=d)


# --------------------------------------------------------------------------- exact intersection test
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kinds", [(a, b) for a in KINDS for b in KINDS])
def test_intersection_test_matches_brute_force(d, kinds):
    gen = torch.Generator().manual_seed(7 * d + 3 * KINDS.index(kinds[0]) + KINDS.index(kinds[1]))
    n = 16
    laws1, laws2 = _laws(kinds[0], n, d, gen), _laws(kinds[1], n, d, gen)
    c1 = torch.randn(n, d, generator=gen, dtype=F64)
    c2 = c1 + 3 * torch.randn(n, d, generator=gen, dtype=F64)
    r1, r2 = 0.5 + 2 * torch.rand(n, generator=gen, dtype=F64), 0.5 + 2 * torch.rand(n, generator=gen, dtype=F64)
    seen = set()
    for i in range(n):
        t = float(separation(c1[i], laws1[i : i + 1], float(r1[i]), _region(c2[i], laws2[i : i + 1], r2[i]))[0])
        gauge = _brute_min_gauge(c1[i], laws1.matrix()[i], r1[i], c2[i], laws2.matrix()[i], r2[i], d)
        if abs(gauge - 1) < 1e-3:
            continue  # too close to touching for the sampled boundary to decide
        assert (t >= 1) == (gauge >= 1), (i, t, gauge)
        seen.add(t >= 1)
    assert seen == {True, False}  # both outcomes occur


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_pairs(kind):
    gen = torch.Generator().manual_seed(11)
    d = 3
    law = _laws(kind, 1, d, gen)
    s = law.matrix()[0]
    x = torch.zeros(d, dtype=F64)
    v = s @ torch.tensor([1.0, 0.0, 0.0], dtype=F64)  # S e_1: on the boundary of E(0, S, 1)
    # touching: E(0, S, 1) and E(2 v, S, 1) share only the boundary point v (open: disjoint)
    touching = _region(2 * v, law, 1.0)
    assert float(separation(x, law, 1.0, touching)[0]) == pytest.approx(1.0, rel=1e-9)
    assert not bool(disjoint(x, law, 1.0 + 1e-6, touching)[0])
    assert bool(disjoint(x, law, 1.0 - 1e-6, touching)[0])
    # nested: a small region inside a large one of another shape
    assert not bool(disjoint(x, law, 3.0, _region(0.1 * v, _iso(0.01, d), 1.0))[0])
    # identical centres always meet (separation 0); far apart never
    assert float(separation(x, law, 1.0, _region(x, _laws("full", 1, d, gen), 0.1))[0]) == 0.0
    assert bool(disjoint(x, law, 1.0, _region(100 * v, law, 1.0))[0])
    # an empty region (r = 0) meets nothing
    assert math.isinf(float(separation(x, law, 0.0, touching)[0]))
    assert math.isinf(float(largest_disjoint_radius(x, law, _region(v, law, 0.0))[0]))


def test_touching_open_balls_are_disjoint():
    """Balls of radius 1 about (0, 0) and (2, 0) share one boundary point; open, they are
    disjoint (the arithmetic here is exact: q(s) = 4 s (1 - s), maximal 1 at s = 1/2)."""
    stored = _region([2.0, 0.0], _iso(1.0), 1.0)
    assert float(separation(torch.zeros(2, dtype=F64), _iso(1.0), 1.0, stored)[0]) == 1.0
    assert bool(disjoint(torch.zeros(2, dtype=F64), _iso(1.0), 1.0, stored)[0])
    assert float(largest_disjoint_radius(torch.zeros(2, dtype=F64), _iso(1.0), stored)[0]) == 1.0


def test_separation_is_the_common_scale_at_which_regions_touch():
    """Both regions scaled by t = separation touch: a slightly smaller scale is disjoint."""
    gen = torch.Generator().manual_seed(5)
    d = 3
    law1, law2 = _laws("full", 1, d, gen), _laws("diag", 1, d, gen)
    c2 = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    t = float(separation(torch.zeros(d, dtype=F64), law1, 0.7, _region(c2, law2, 1.1))[0])
    gauge = _brute_min_gauge(torch.zeros(d, dtype=F64), law1.matrix()[0], 0.7 * t, c2, law2.matrix()[0], 1.1 * t, d)
    assert gauge == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------------- largest disjoint radius
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kinds", [(a, b) for a in KINDS for b in KINDS])
def test_largest_disjoint_radius_touches_and_matches_brute_force(d, kinds):
    gen = torch.Generator().manual_seed(100 + 7 * d + 3 * KINDS.index(kinds[0]) + KINDS.index(kinds[1]))
    n = 4
    law, laws = _laws(kinds[0], 1, d, gen), _laws(kinds[1], n, d, gen)
    x = torch.randn(d, generator=gen, dtype=F64)
    stored = Regions(
        x + 4 * torch.randn(n, d, generator=gen, dtype=F64), laws, 0.5 + torch.rand(n, generator=gen, dtype=F64)
    )
    r = largest_disjoint_radius(x, law, stored)
    for j in range(n):
        one = _region(stored.centres[j], laws[j : j + 1], stored.gaps[j])
        if bool(contains(one, x)[0]):
            assert float(r[j]) == 0
            continue
        brute = _brute_touching_radius(x, law.matrix()[0], stored.centres[j], laws.matrix()[j], stored.gaps[j], d)
        assert float(r[j]) == pytest.approx(brute, rel=1e-6)
        assert bool(disjoint(x, law, float(r[j]) * (1 - 1e-6), one)[0])
        assert not bool(disjoint(x, law, float(r[j]) * (1 + 1e-3), one)[0])
        # bisection on r with the exact intersection test finds the same radius (the bracket,
        # from brute force, holds the answer: disjoint at its lower end, meeting at its upper)
        lo, hi = brute * (1 - 1e-5), brute * (1 + 1e-5)
        assert bool(disjoint(x, law, lo, one)[0]) and not bool(disjoint(x, law, hi, one)[0])
        for _ in range(25):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if bool(disjoint(x, law, mid, one)[0]) else (lo, mid)
        assert float(r[j]) == pytest.approx(lo, rel=1e-9)


def test_ball_against_ball_is_closed_form():
    gen = torch.Generator().manual_seed(2)
    d = 784
    x = torch.rand(d, generator=gen, dtype=F64)
    centres = x + torch.randn(5, d, generator=gen, dtype=F64)
    sigmas, gaps = (
        torch.tensor([0.1, 0.25, 0.5, 1.0, 2.0], dtype=F64),
        torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0], dtype=F64),
    )
    stored = Regions(centres, Isotropic(sigmas, dim=d), gaps)
    sigma = 0.3
    want = ((centres - x).norm(dim=1) - gaps * sigmas).clamp(min=0) / sigma
    assert torch.allclose(largest_disjoint_radius(x, _iso(sigma, d), stored), want, rtol=1e-12)
    # the same balls as full matrices take the dense path: same radii
    dense = Regions(centres[:2], Isotropic(sigmas[:2], dim=d).as_full(), gaps[:2])
    assert torch.allclose(largest_disjoint_radius(x, _iso(sigma, d).as_full(), dense), want[:2], rtol=1e-9)
    # from inside a ball: the contained radius is (R - ||c - x||) / sigma
    inner = Regions(x + 0.01 * (centres - x), Isotropic(sigmas, dim=d), gaps * 10)
    want_in = (gaps * 10 * sigmas - 0.01 * (centres - x).norm(dim=1)).clamp(min=0) / sigma
    assert torch.allclose(largest_contained_radius(x, _iso(sigma, d), inner), want_in, rtol=1e-12)


# --------------------------------------------------------------------------- largest contained radius
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kinds", [(a, b) for a in KINDS for b in KINDS])
def test_largest_contained_radius_touches_and_matches_brute_force(d, kinds):
    gen = torch.Generator().manual_seed(200 + 7 * d + 3 * KINDS.index(kinds[0]) + KINDS.index(kinds[1]))
    n = 4
    law, laws = _laws(kinds[0], 1, d, gen), _laws(kinds[1], n, d, gen)
    gaps = 1 + torch.rand(n, generator=gen, dtype=F64)
    # x at a random point of each stored region (u uniform in the unit ball, shrunk by 0.9)
    u = torch.randn(n, d, generator=gen, dtype=F64)
    u = 0.9 * u / u.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=gen, dtype=F64) ** (1 / d)
    x = torch.randn(d, generator=gen, dtype=F64)
    centres = x - (laws.matrix() @ (gaps[:, None] * u)[..., None]).squeeze(-1)
    stored = Regions(centres, laws, gaps)
    assert contains(stored, x).all()
    r = largest_contained_radius(x, law, stored)
    s = law.matrix()[0]
    for j in range(n):
        s2 = laws.matrix()[j]
        assert float(r[j]) == pytest.approx(_brute_touching_radius(x, s, centres[j], s2, gaps[j], d), rel=1e-6)
        # E(x, S, r) inside: every boundary point has gauge < 1 in the stored region; 1e-3 more pokes out
        for factor, inside in ((1 - 1e-6, True), (1 + 1e-3, False)):
            rf = float(r[j]) * factor
            gauge = -_min_on_sphere(lambda u, rf=rf, c=centres[j], s2=s2: -_norm_in(x + rf * u @ s.T, c, s2), d)
            gauge /= float(gaps[j])
            assert (gauge < 1) == inside
    # x outside: 0
    assert float(largest_contained_radius(x + 100, law, stored)[0]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_contained_radius_at_the_centre_is_the_inverse_spectral_norm(kind):
    """Concentric: E(c, S, r) lies in E(c, S2, r2) iff r ||S2^-1 S||_2 <= r2 (the hard case of the
    secular equation: the offset has no component along the smallest axis)."""
    gen = torch.Generator().manual_seed(3)
    d = 5
    law, law2 = _laws(kind, 1, d, gen), _laws("full", 1, d, gen)
    c = torch.randn(d, generator=gen, dtype=F64)
    want = 1.7 / torch.linalg.matrix_norm(torch.linalg.solve(law2.matrix()[0], law.matrix()[0]), 2)
    assert float(largest_contained_radius(c, law, _region(c, law2, 1.7))[0]) == pytest.approx(float(want), rel=1e-10)


def test_hard_case_off_centre():
    """x = (0.5, 0) in the ellipse x^2/9 + y^2 < 1 (S = I): the nearest boundary points are
    (0.5625, +-0.992...) at distance sqrt(0.96875), not the end of the short axis."""
    stored = _region([0.0, 0.0], Diagonal(torch.tensor([[3.0, 1.0]], dtype=F64)), 1.0)
    r = largest_contained_radius(torch.tensor([0.5, 0.0], dtype=F64), _iso(1.0), stored)
    assert float(r[0]) == pytest.approx(math.sqrt(0.96875), rel=1e-12)


def test_orthogonal_invariance():
    gen = torch.Generator().manual_seed(9)
    d, n = 5, 8
    law, laws = _laws("full", 1, d, gen), _laws("diag", n, d, gen)
    x = torch.randn(d, generator=gen, dtype=F64)
    centres = x + 2 * torch.randn(n, d, generator=gen, dtype=F64)
    gaps = 0.5 + torch.rand(n, generator=gen, dtype=F64)
    stored = Regions(centres, laws, gaps)
    u = _orthogonal(d, gen)
    turned = Regions(centres @ u.T, FullSPD(u @ laws.matrix() @ u.T), gaps)  # diagonal -> rotated full
    law_u = FullSPD(u @ law.matrix() @ u.T)
    inside = Regions(x + 0.1 * (centres - x), laws, gaps * 5)
    inside_u = Regions(inside.centres @ u.T, turned.laws, inside.gaps)
    for fn in (largest_disjoint_radius, largest_contained_radius):
        for a, b in ((stored, turned), (inside, inside_u)):
            assert torch.allclose(fn(x, law, a), fn(u @ x, law_u, b), rtol=1e-9, atol=1e-12)
    assert torch.allclose(separation(x, law, 0.8, stored), separation(u @ x, law_u, 0.8, turned), rtol=1e-9)


def test_bad_inputs_raise_one_line_errors():
    law = _iso(1.0)
    with pytest.raises(RDDRSError, match="gaps"):
        Regions(torch.zeros(1, 2, dtype=F64), law, torch.tensor([-1.0], dtype=F64))
    with pytest.raises(RDDRSError, match="shape"):
        Regions(torch.zeros(2, 2, dtype=F64), law, torch.tensor([1.0], dtype=F64))
    stored = _region([0.0, 0.0], law, 1.0)
    with pytest.raises(RDDRSError, match="features"):
        largest_disjoint_radius(torch.zeros(3, dtype=F64), law, stored)
    with pytest.raises(RDDRSError, match="gap"):
        separation(torch.zeros(2, dtype=F64), law, -0.5, stored)
    with pytest.raises(RDDRSError, match="one smoothing law"):
        largest_disjoint_radius(torch.zeros(2, dtype=F64), Isotropic(torch.ones(2, dtype=F64), dim=2), stored)


# --------------------------------------------------------------------------- the memory
HAND_MADE = [  # x, sigma, gap, class -> expected class, gap, status
    ((0.0, 0.0), 1.0, 1.0, 0, (0, 1.0, KEPT)),
    ((1.5, 0.0), 1.0, 1.0, 1, (1, 0.5, SHRUNK)),  # meets the first: (1.5 - 1) / 1
    ((0.2, 0.0), 0.5, 2.0, 1, (0, 1.6, RELABELLED)),  # inside the first: (1 - 0.2) / 0.5
    ((0.0, 5.0), 1.0, 1.0, 2, (2, 1.0, KEPT)),  # far from all
    ((1.9, 0.0), 1.0, 1.0, 1, (1, 0.9, SHRUNK)),  # inside its own class' region; 0.9 from class 0
    ((-0.5, 0.0), 1.0, 1.0, 0, (0, 1.0, KEPT)),  # overlaps its own class only
]


@pytest.mark.parametrize("screen", [True, False])
def test_hand_made_sequence(screen):
    memory = Memory(screen=screen)
    for x, sigma, gap, label, (want_label, want_gap, want_status) in HAND_MADE:
        got = memory.admit(torch.tensor(x, dtype=F64), _iso(sigma), gap, label)
        tol = TOUCH_TOLERANCE if want_status != KEPT else 0
        assert (got.label, got.status) == (want_label, want_status)
        assert got.gap == pytest.approx(want_gap * (1 - tol), rel=1e-12)
    assert memory.labels == [0, 1, 0, 2, 1, 0] and len(memory) == 6


def test_relabelling_follows_the_first_stored_region_that_contains_x():
    memory = Memory()
    memory.admit(torch.zeros(2, dtype=F64), _iso(1.0), 3.0, 0)  # radius 3 about 0
    memory.admit(torch.tensor([0.5, 0.0], dtype=F64), _iso(0.1), 2.0, 0)  # radius 0.2, inside it
    got = memory.decide(torch.tensor([0.6, 0.0], dtype=F64), _iso(1.0), 1.0, 1)  # in both
    assert (got.label, got.status) == (0, RELABELLED)
    assert got.gap == pytest.approx((3.0 - 0.6) * (1 - TOUCH_TOLERANCE), rel=1e-12)  # the first, not (0.2 - 0.1)


def _random_sequence(kind, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    laws = _laws(kind, n, d, gen)
    xs = 4 * torch.rand(n, d, generator=gen, dtype=F64)
    gaps = 0.3 + 1.2 * torch.rand(n, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return xs, laws, gaps, labels


@pytest.mark.parametrize("kind", KINDS)
def test_memory_leaves_no_contradiction_and_screening_changes_nothing(kind):
    d, n = 3, 40
    xs, laws, gaps, labels = _random_sequence(kind, n, d, seed=KINDS.index(kind))
    screened, exact = Memory(), Memory(screen=False)
    decisions = []
    for i in range(n):
        a = screened.admit(xs[i], laws[i : i + 1], float(gaps[i]), int(labels[i]))
        b = exact.admit(xs[i], laws[i : i + 1], float(gaps[i]), int(labels[i]))
        assert a == b
        decisions.append(a)
    statuses = {dec.status for dec in decisions}
    assert {KEPT, SHRUNK, RELABELLED} <= statuses, statuses
    stored = screened.regions()
    for i, dec in enumerate(decisions):
        if dec.status in (KEPT, SHRUNK):
            assert dec.label == int(labels[i]) and dec.gap <= float(gaps[i])
        others = [j for j in range(n) if screened.labels[j] != dec.label]
        if others:  # the independent intersection test: no region meets one of another class
            t = separation(
                xs[i],
                laws[i : i + 1],
                dec.gap,
                Regions(stored.centres[others], stored.laws[others], stored.gaps[others]),
            )
            assert (t >= 1).all(), (i, dec, t.min())


def test_memory_is_invariant_under_rotation():
    d, n = 4, 30
    xs, laws, gaps, labels = _random_sequence("full", n, d, seed=21)
    u = _orthogonal(d, torch.Generator().manual_seed(1))
    turned = FullSPD(u @ laws.matrix() @ u.T)
    plain, rotated = Memory(), Memory()
    for i in range(n):
        a = plain.admit(xs[i], laws[i : i + 1], float(gaps[i]), int(labels[i]))
        b = rotated.admit(u @ xs[i], turned[i : i + 1], float(gaps[i]), int(labels[i]))
        assert (a.label, a.status) == (b.label, b.status) and a.gap == pytest.approx(b.gap, rel=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_gauges_say_what_contains_says_for_many_points(kind):
    d, n = 4, 6
    xs, laws, gaps, _ = _random_sequence(kind, n, d, seed=11)
    gaps[2] = 0  # an empty region holds no point
    stored = Regions(xs, laws, gaps)
    gen = torch.Generator().manual_seed(12)
    points = torch.cat([xs + 0.3 * torch.randn(n, d, generator=gen, dtype=F64), 4 * torch.rand(40, d, generator=gen)])
    got = gauges(stored, points.float())
    assert got.shape == (n, len(points)) and (got < 1).any() and not (got < 1).all() and torch.isinf(got[2]).all()
    assert torch.equal(got < 1, torch.stack([contains(stored, p) for p in points.float()], dim=1))
    for j in (0, 5):  # against the definition, with an explicit inverse
        want = (torch.linalg.inv(laws.matrix()[j]) @ (points.float().double() - xs[j]).T).norm(dim=0) / gaps[j]
        assert torch.allclose(got[j], want, rtol=1e-9)
    assert gauges(stored, points[:0]).shape == (n, 0)
    assert "features" in raises_one_line(gauges, stored, points[:, :3])


def test_memory_with_loaded_parameters_matches_kept_ones():
    d, n = 3, 25
    xs, laws, gaps, labels = _random_sequence("full", n, d, seed=4)
    loads = []

    def load(key):
        loads.append(key)
        return laws.param[key]

    kept, loading = Memory(), Memory(load=load)
    for i in range(n):
        a = kept.admit(xs[i], laws[i : i + 1], float(gaps[i]), int(labels[i]))
        assert a == loading.admit(xs[i], laws[i : i + 1], float(gaps[i]), int(labels[i]), key=i)
    assert loads  # parameters were read back by key
    with pytest.raises(RDDRSError, match="key"):
        loading.store(xs[0], laws[0:1], 1.0, 0)
    with pytest.raises(RDDRSError, match="one smoothing family"):
        kept.store(xs[0], _iso(1.0, d), 1.0, 0)


# --------------------------------------------------------------------------- result files
def _result_file(tmp_path, method, xs, params, gaps, predicts, labels, abstain=(), rotate=None, name=None):
    """A result file as ``rddrs certify`` writes it, for inputs ``xs`` (n, d) at idx 0..n-1."""
    out = tmp_path / f"{name or method}.tsv"
    laws = (
        Isotropic(params, dim=xs.shape[1])
        if params.dim() == 1
        else Diagonal(params)
        if params.dim() == 2
        else FullSPD(params)
    )
    rows = []
    for i in range(len(xs)):
        gap = 0.0 if i in abstain else float(gaps[i])
        predict = -1 if i in abstain else int(predicts[i])
        smin, sproxy, smax = (float(v[i]) for v in (laws.min_scale(), laws.proxy(), laws.max_scale()))
        rows.append(
            {
                "idx": i,
                "label": int(labels[i]),
                "predict": predict,
                "correct": int(predict == int(labels[i])),
                "gap": gap,
                "radius": gap * smin,
                "proxy_radius": gap * sproxy,
                "sigma_min": smin,
                "sigma_proxy": sproxy,
                "sigma_max": smax,
                "p_lower": 0.5 + 0.01 * i,
                "seconds": 1.0,
            }
        )
    write_rows(out, rows)
    (tmp_path / f"{out.name}.json").write_text(
        json.dumps({"settings": {"method": method, "sigma": 0.5, "rotate": rotate}})
    )
    if method != "rs":
        traces = tmp_path / f"{out.name}.traces"
        traces.mkdir()
        for i in range(len(xs)):
            np.savez(traces / f"{i}.npz", param=params[i].float().numpy())
    return out


def test_apply_memory_on_the_hand_made_sequence(tmp_path):
    xs = torch.tensor([row[0] for row in HAND_MADE], dtype=F64)
    sigmas = torch.tensor([row[1] for row in HAND_MADE], dtype=F64)
    gaps = torch.tensor([row[2] for row in HAND_MADE], dtype=F64)
    classes = [row[3] for row in HAND_MADE]
    xs, sigmas, gaps = (torch.cat([t, t[:1]]) for t in (xs, sigmas, gaps))  # a 7th input, abstained
    out = _result_file(tmp_path, "ddrs", xs, sigmas, gaps, classes + [0], [0, 1, 1, 2, 1, 0, 0], abstain=(6,))
    images = xs.float().reshape(-1, 1, 1, 2)
    path = apply_memory(out, images, 0, progress=False)
    assert path == memory_path(out) and path.read_text().splitlines()[0].split("\t") == list(MEMORY_COLUMNS)
    rows = read_memory_rows(path)
    assert [r["memory"] for r in rows] == [row[4][2] for row in HAND_MADE] + [ABSTAINED]
    assert [r["predict"] for r in rows] == [row[4][0] for row in HAND_MADE] + [-1]
    for r, (*_, (_, want_gap, status)) in zip(rows, HAND_MADE):
        assert r["gap"] == pytest.approx(want_gap, rel=1e-6)  # images are float32
        assert r["radius"] == r["gap"] * r["sigma_min"] and r["proxy_radius"] == r["gap"] * r["sigma_proxy"]
        assert r["correct"] == int(r["predict"] == r["label"])
    assert [r["correct"] for r in rows] == [1, 1, 0, 1, 1, 1, 0]  # the relabelled input is now wrong
    side = json.loads((tmp_path / "ddrs.tsv.memory.tsv.json").read_text())
    assert side["settings"]["method"] == "ddrs" and side["memory"]["source"] == "ddrs.tsv"


@pytest.mark.parametrize("method", ["ancer", "rddrs"])
def test_apply_memory_resumes_after_a_kill(tmp_path, method):
    d, n = 3, 30
    xs, laws, gaps, labels = _random_sequence("diag" if method == "ancer" else "full", n, d, seed=8)
    out = _result_file(
        tmp_path, method, xs.float().double(), laws.param.float().double(), gaps, labels, labels, abstain=(3, 17)
    )
    images = xs.float().reshape(n, 1, d)
    path = apply_memory(out, images, 0, progress=False)
    whole = path.read_text()
    statuses = [r["memory"] for r in read_memory_rows(path)]
    assert {KEPT, SHRUNK, RELABELLED, ABSTAINED} <= set(statuses)
    lines = whole.splitlines(keepends=True)
    path.write_text("".join(lines[:13]) + lines[13][:20])  # killed while writing the 13th row
    assert apply_memory(out, images, 0, progress=False) == path
    assert path.read_text() == whole
    assert apply_memory(out, images, 0, progress=False) == path and path.read_text() == whole  # done: no-op
    shutil.rmtree(traces_dir(out))  # a complete pass is read as it is (traces are not committed)
    assert apply_memory(out, images, 0, progress=False) == path and path.read_text() == whole
    # the same rows processed by a fresh memory agree with the file (rows follow the memory)
    memory = Memory()
    for i, r in enumerate(read_memory_rows(path)):
        if r["memory"] != ABSTAINED:
            dec = memory.admit(
                images[i].double(),
                laws[i : i + 1].with_param(laws.param[i : i + 1].float().double()),
                float(gaps[i]),
                int(labels[i]),
            )
            assert (dec.label, dec.gap, dec.status) == (r["predict"], r["gap"], r["memory"])


def test_apply_memory_rotates_the_images_as_the_run_did(tmp_path):
    """A run with ``--rotate SEED`` certifies U x with its parameters in rotated coordinates:
    the pass on it equals the pass on an unrotated file whose images are U x."""
    d, n = 3, 20
    xs, laws, gaps, labels = _random_sequence("full", n, d, seed=6)
    u = random_orthogonal(d, seed=5)
    turned = _result_file(tmp_path, "rddrs", xs, laws.param, gaps, labels, labels, rotate=5, name="turned")
    plain = _result_file(tmp_path, "rddrs", xs, laws.param, gaps, labels, labels, name="plain")
    images = (xs @ u).reshape(n, 1, d)  # U^T x: the run's inputs before it turned them
    a = read_memory_rows(apply_memory(turned, images, 0, progress=False))
    b = read_memory_rows(apply_memory(plain, images @ u.T, 0, progress=False))
    assert len({r["memory"] for r in a}) > 1
    for ra, rb in zip(a, b):
        assert (ra["predict"], ra["memory"]) == (rb["predict"], rb["memory"])
        assert ra["gap"] == pytest.approx(rb["gap"], rel=1e-9)


def test_apply_memory_errors(tmp_path):
    d, n = 2, 5
    xs, laws, gaps, labels = _random_sequence("diag", n, d, seed=1)
    out = _result_file(tmp_path, "ancer", xs, laws.param, gaps, labels, labels)
    images = xs.float().reshape(n, 1, d)
    (tmp_path / "ancer.tsv.traces" / "2.npz").unlink()
    with pytest.raises(RDDRSError, match="missing trace"):
        apply_memory(out, images, 0, progress=False)
    np.savez(tmp_path / "ancer.tsv.traces" / "2.npz", ancer=np.zeros(3))
    with pytest.raises(RDDRSError, match="no 'param'"):
        apply_memory(out, images, 0, progress=False)
    with pytest.raises(RDDRSError, match="outside the images"):
        apply_memory(out, images[:3], 0, progress=False)
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:3] + text[4:]))  # idx 2 missing
    with pytest.raises(RDDRSError, match="misses idx 2"):
        apply_memory(out, images, 0, progress=False)
    memory_path(out).write_text("\t".join(COLUMNS) + "\n")
    out.write_text("".join(text[:3]))  # the first two rows only: fine, then a foreign memory file
    with pytest.raises(RDDRSError, match="not a memory file"):
        apply_memory(out, images, 0, progress=False)
    with pytest.raises(RDDRSError, match="no such result file"):
        apply_memory(tmp_path / "none.tsv", images, 0, progress=False)
    (tmp_path / "ancer.tsv.json").write_text("{")
    with pytest.raises(RDDRSError, match="not the sidecar"):
        apply_memory(out, images, 0, progress=False)


# --------------------------------------------------------------------------- the command line
def test_cli_memory_on_a_smoke_run(tmp_path, capsys):
    from pathlib import Path

    from rddrs.pipeline.models import MnistCNN

    data = Path(__file__).resolve().parents[1] / "data"
    torch.manual_seed(0)
    model = tmp_path / "cnn.pt"
    torch.save({"state_dict": MnistCNN().state_dict(), "arch": "MnistCNN"}, model)
    out = tmp_path / "ancer.tsv"
    args = [
        "certify",
        "--method",
        "ancer",
        "--sigma",
        "0.25",
        "--model",
        str(model),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--data",
        str(data),
        "--quiet",
        "--count",
        "3",
    ]
    assert main(args + ["--memory"]) == 0
    assert "memory:" in capsys.readouterr().out
    path = memory_path(out)
    first = path.read_text()
    rows = read_memory_rows(path)
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert all(r["memory"] in (KEPT, SHRUNK, RELABELLED, ABSTAINED) for r in rows)
    assert main(["memory", str(out), "--data", str(data), "--quiet"]) == 0  # already done: unchanged
    assert path.read_text() == first
    path.unlink()
    assert main(["memory", str(out), "--data", str(data), "--quiet"]) == 0  # from scratch: the same
    assert path.read_text() == first
    assert main(["memory", str(tmp_path / "none.tsv"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such result file" in err and len(err.splitlines()) == 1
    path.unlink()
    tmp_path.chmod(0o555)  # a folder that cannot take the memory's file: one line, nothing written
    try:
        proc = run_bound_by_permissions(["memory", out, "--data", data, "--quiet"], tmp_path)
    finally:
        tmp_path.chmod(0o755)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"rddrs memory: error: cannot write in {tmp_path} (PermissionError")
    assert not path.exists()


def test_a_second_memory_pass_on_the_same_file_is_refused(tmp_path):
    import fcntl

    xs = torch.tensor([row[0] for row in HAND_MADE], dtype=F64)
    sigmas = torch.tensor([row[1] for row in HAND_MADE], dtype=F64)
    gaps = torch.tensor([row[2] for row in HAND_MADE], dtype=F64)
    classes = [row[3] for row in HAND_MADE]
    out = _result_file(tmp_path, "ddrs", xs, sigmas, gaps, classes, classes)
    images = xs.float().reshape(-1, 1, 1, 2)
    lock = memory_path(out).with_name(memory_path(out).name + ".lock")
    with open(lock, "w") as held:  # as a pass in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RDDRSError, match="being written by another process"):
            apply_memory(out, images, 0, progress=False)
    assert len(read_memory_rows(apply_memory(out, images, 0, progress=False))) == len(HAND_MADE)


def test_survival_counts_what_the_memory_leaves(tmp_path):
    from rddrs.studies.mechanism import survival

    xs = torch.tensor([row[0] for row in HAND_MADE] + [HAND_MADE[0][0]], dtype=F64)
    sigmas = torch.tensor([row[1] for row in HAND_MADE] + [1.0], dtype=F64)
    gaps = torch.tensor([row[2] for row in HAND_MADE] + [1.0], dtype=F64)
    run_labels = [0, 1, 1, 2, 1, 0, 0]
    out = _result_file(
        tmp_path, "ddrs", xs, sigmas, gaps, [row[3] for row in HAND_MADE] + [0], run_labels, abstain=(6,)
    )
    # the test set: the run's 7 images, then 3 others (one of class 3 inside regions of class 0)
    images = torch.cat([xs, torch.tensor([[0.0, 0.5], [0.0, 5.2], [9.0, 9.0]], dtype=F64)]).float()
    labels = torch.tensor(run_labels + [3, 2, 1])
    got = survival(out, images.reshape(-1, 1, 1, 2), labels)
    assert got["images"] == 7
    assert got["statuses"] == {KEPT: 3, SHRUNK: 2, RELABELLED: 1, ABSTAINED: 1}
    before, after = read_rows(out), read_memory_rows(memory_path(out))
    for when, rows in (("before", list(before.values())), ("after", after)):
        for kind, column in (("l2", "radius"), ("proxy", "proxy_radius")):
            assert got[when][kind] == pytest.approx(np.mean([r[column] * r["correct"] for r in rows]))
    assert got["after"]["l2"] < got["before"]["l2"]  # shrunk and relabelled certificates count less
    # by hand: each region {c + sigma u : |u| < gap} after the memory, and the other points of other classes in it
    inside = np.array(
        [
            [
                np.linalg.norm(images[p].double().numpy() - xs[r["idx"]].numpy()) < r["gap"] * r["sigma_min"]
                and int(labels[p]) != r["predict"]
                and p != r["idx"]
                for p in range(len(images))
            ]
            for r in after
            if r["memory"] != ABSTAINED
        ]
    )
    assert got["intruders"] == inside.any(0).sum() >= 2  # the class-3 point and image 2 (relabelled to 0)
    assert got["regions_with_intruders"] == inside.any(1).sum()
    kept = [r for r in after if r["memory"] != ABSTAINED]
    assert got["nearest_other"][0] == pytest.approx(
        min(
            np.linalg.norm(images[p].double().numpy() - xs[0].numpy()) / kept[0]["gap"]
            for p in range(len(images))
            if int(labels[p]) != kept[0]["predict"]
        ),
        rel=1e-6,
    )
