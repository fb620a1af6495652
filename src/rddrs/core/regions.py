"""Memory-based sound certification: certified regions that never contradict each other.

A certificate says that the smoothed classifier answers class c on the open region
``E(x, S, r) = {x + S u : ||u||_2 < r}``. With data-dependent smoothing every input has its own
S, so the regions of two inputs may overlap while claiming different classes (Sukenik et al.,
ICML 2022). The memory certifies inputs in a fixed order (ascending test index) and keeps the
regions already certified; a new input

(a) that lies inside a stored region of another class takes that class, and its region becomes
    the largest ``E(x, S, r')`` inside that stored region (the first stored one, if several
    contain x; they all have the same class, as regions of different classes never meet);
(b) else, if its region meets stored regions of other classes, has r shrunk to the largest
    value for which it meets none of them;
(c) is stored, with its (possibly changed) class and gap. Abstentions are not stored.

Hence no two stored regions of different classes intersect, whatever the order of arrival.

Exact geometry (float64). Whiten by the query's S: ``u = S^-1 (y - x)``. The query region
becomes the ball ``||u|| < r`` and a stored region ``E(c, S', r')`` the ellipsoid with centre
``m = S^-1 (c - x)`` and shape matrix ``B = r'^2 T T^T``, ``T = S^-1 S'``. With
``B = Phi diag(beta) Phi^T`` and ``a = Phi^T m`` it is ``{m + Phi t : sum t_i^2 / beta_i < 1}``.
When both scales are diagonal no eigendecomposition is needed; when one is a multiple of the
identity, ``Phi`` is the other's eigenbasis (one ``eigh`` per matrix, not per pair); otherwise
``T T^T`` is diagonalised for each pair (about 0.2 s at d = 784).

* Largest disjoint radius: the distance from 0 to the stored ellipsoid (0 if inside it). The
  largest contained radius: the distance from 0 to its boundary (0 if outside). Both solve
  ``min ||a + t||^2`` over ``sum t_i^2 / beta_i <= 1`` (resp. ``= 1``), a trust-region problem
  whose Lagrangian dual is exact (S-lemma): its value is the maximum of the concave function
  ``F(nu) = nu (sum a_i^2 / (beta_i + nu) - 1)`` over ``nu >= 0`` (resp.
  ``-beta_min <= nu <= 0``). The maximiser solves the secular equation
  ``sum a_i^2 beta_i / (beta_i + nu)^2 = 1`` (safeguarded Newton on the nearly linear
  ``||w(nu)||^-1 - 1``), or is the end ``-beta_min`` where that equation has no root (the
  "hard case", e.g. x at the stored centre: distance ``sqrt(beta_min)``).
* Intersection test (Gilitschenski and Hanebeck, 2012): closed ellipsoids with shape matrices
  A1, A2 and centre offset delta meet iff ``K(s) = 1 - delta^T [A1/(1-s) + A2/s]^-1 delta >= 0``
  for every s in (0, 1). Whitened, ``q(s) = 1 - K(s) = sum a_i^2 s(1-s) / (r^2 s + beta_i (1-s))``
  is concave, and ``sqrt(max_s q)`` is the factor by which both regions must be scaled about
  their centres to touch (``separation``). The open regions are disjoint iff it is >= 1
  (at exactly 1 the closed ones touch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.noise import Smoothing

#: what the memory makes of a certificate (``Decision.status``)
KEPT, SHRUNK, RELABELLED = "kept", "shrunk", "relabelled"


#: Shrunk and relabelled radii are reduced by this relative amount, so that rounding errors
#: in the exact radius (far smaller) cannot leave two stored regions overlapping.
TOUCH_TOLERANCE = 1e-9


_NEWTON_STEPS = 200  # safeguarded Newton; bisection alone would need about 55 to converge


_CHUNK_ELEMENTS = 1 << 20  # float64 numbers per batch of exact pair computations (8 MiB)


@dataclass(frozen=True)
class Regions:
    """Certified regions ``{c_j + S_j u : ||u|| < r_j}``: centres (N, d), laws (batch N), gaps (N,)."""

    centres: Tensor
    laws: Smoothing
    gaps: Tensor

    def __post_init__(self):
        n = self.laws.batch
        if self.centres.dim() != 2 or self.centres.shape != (n, self.laws.dim):
            raise RDDRSError(
                f"centres must have shape (N, d) = ({n}, {self.laws.dim}), got {tuple(self.centres.shape)}"
            )
        if self.gaps.shape != (n,):
            raise RDDRSError(f"gaps must have shape ({n},), got {tuple(self.gaps.shape)}")
        if not (torch.isfinite(self.gaps).all() and (self.gaps >= 0).all()):
            raise RDDRSError("gaps r must be finite and >= 0")

    def __len__(self) -> int:
        return self.laws.batch


def _float64(law: Smoothing) -> Smoothing:
    return law if law.param.dtype == torch.float64 else law.with_param(law.param.double())


def _query(x: Tensor, law: Smoothing, stored: Regions) -> tuple[Tensor, Smoothing]:
    """The query centre as (d,) float64 and its law in float64, checked against ``stored``."""
    if law.batch != 1:
        raise RDDRSError(f"the query needs one smoothing law, got a batch of {law.batch}")
    x = torch.as_tensor(x).reshape(-1).double()
    if x.numel() != law.dim or law.dim != stored.laws.dim:
        raise RDDRSError(
            f"dimensions differ: x has {x.numel()} features, its law d={law.dim}, "
            f"the stored regions d={stored.laws.dim}"
        )
    if not torch.isfinite(x).all():
        raise RDDRSError("x contains NaN or infinite values")
    return x, _float64(law)


def _pair_geometry(x: Tensor, law: Smoothing, stored: Regions) -> tuple[Tensor, Tensor]:
    """Squared coordinates ``a^2`` and semi-axes squared ``beta`` (N, d) of the stored regions
    in coordinates whitened by the query's S (see the module notes)."""
    laws = _float64(stored.laws)
    offset = stored.centres.double() - x
    r2 = stored.gaps.double()[:, None] ** 2
    if not law.dense and not laws.dense:
        s, s2 = law.diagonal(), laws.diagonal()
        return (offset / s) ** 2, r2 * (s2 / s) ** 2
    if law.scalar:  # Phi: the stored eigenbases (param: the query's scale)
        w2, v2 = laws.eig
        return ((offset[:, None, :] @ v2).squeeze(1) / law.param) ** 2, r2 * (w2 / law.param) ** 2
    if laws.scalar:  # Phi: the query's eigenbasis
        w, v = law.eig
        return (offset @ v[0] / w) ** 2, r2 * (laws.param[:, None] / w) ** 2
    t = law.solve(laws.matrix())
    mu, phi = spd.eigh(t @ t.transpose(-1, -2))
    m = law.solve(offset[..., None])
    return (phi.transpose(-1, -2) @ m).squeeze(-1) ** 2, r2 * mu.clamp(min=0)


def _chunks(n: int, d: int, dense: bool):
    """Index ranges over n pairs, each batch holding at most ``_CHUNK_ELEMENTS`` numbers."""
    size = max(1, _CHUNK_ELEMENTS // (d * d if dense else d))
    return (slice(lo, lo + size) for lo in range(0, n, size))


def _is_dense(law: Smoothing, stored: Regions) -> bool:
    return law.dense or stored.laws.dense


def _subset(stored: Regions, index) -> Regions:
    """Some of the regions (``with_param``: no eigendecomposition of the others is computed)."""
    return Regions(stored.centres[index], stored.laws.with_param(stored.laws.param[index]), stored.gaps[index])


def _chunked(fn, x: Tensor, law: Smoothing, stored: Regions) -> Tensor:
    """``fn`` of the pair geometry, computed in memory-bounded batches of stored regions."""
    parts = [
        fn(*_pair_geometry(x, law, _subset(stored, part)))
        for part in _chunks(len(stored), law.dim, _is_dense(law, stored))
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=x.device)


def _safeguarded_newton(step, lo: Tensor, hi: Tensor, start: Tensor) -> Tensor:
    """One root per row in ``[lo, hi]``: ``step(t)`` gives (whether the root lies right of t,
    the Newton iterate from t). Iterates outside the shrinking bracket are replaced by its
    midpoint, and a row stops moving once its step is below rounding (so its result does not
    depend on the other rows of the batch)."""
    t, tol = start, 4 * torch.finfo(start.dtype).eps * hi
    for _ in range(_NEWTON_STEPS):
        right, newton = step(t)
        lo, hi = torch.where(right, t, lo), torch.where(right, hi, t)
        new = torch.where((newton >= lo) & (newton <= hi), newton, (lo + hi) / 2)
        settled = (new - t).abs() <= tol
        t = torch.where(settled, t, new)
        if bool(settled.all()):
            break
    return t


def _dual_distance(a2: Tensor, beta: Tensor, inward: bool) -> Tensor:
    """``sqrt(max F)``, ``F(nu) = nu (sum a_i^2 / (beta_i + nu) - 1)``, over ``nu >= 0``
    (``inward`` False: distance from 0 to the ellipsoid) or ``-beta_min <= nu <= 0`` (True:
    distance from 0 to the boundary when 0 is inside); one value per row of (N, d) inputs.

    ``nu = nu_0 + tau`` with tau in a bracket ``[0, tau_max]`` that holds the maximiser; the
    denominators ``(beta_i + nu_0) + tau`` are formed without cancellation. The maximiser is
    the root of ``F'(nu) = ||w(nu)||^2 - 1``, ``||w||^2 = sum a_i^2 beta_i / (beta_i + nu)^2``,
    found by Newton on ``1/||w|| - 1`` (concave and increasing, nearly linear), whose step
    is ``n2 (1 - sqrt(n2)) / sum(a_i^2 beta_i / (beta_i + nu)^3)`` with ``n2 = ||w||^2``.
    """
    if inward:
        lowest = beta.amin(-1)
        base, nu0, tau_max = beta - lowest[:, None], -lowest, lowest
    else:
        base, nu0 = beta, torch.zeros_like(beta[:, 0])
        tau_max = (beta.amax(-1) * a2.sum(-1)).sqrt()  # there F' <= 0
    weights = a2 * beta

    def step(tau):
        den = base + tau[:, None]
        n2 = (weights / den**2).sum(-1)
        return n2 > 1, tau - n2 * (1 - n2.sqrt()) / (weights / den**3).sum(-1)

    lo = torch.zeros_like(tau_max)
    tau = _safeguarded_newton(step, lo, tau_max, tau_max / 2 if inward else lo)  # inward: tau = 0 may divide by 0
    value = (nu0 + tau) * ((a2 / (base + tau[:, None])).sum(-1) - 1)
    return value.clamp(min=0).sqrt()


def _max_q(a2: Tensor, beta: Tensor, r2: float) -> Tensor:
    """``max_s q(s)``, ``q(s) = sum a_i^2 s(1-s) / D_i``, ``D_i = r^2 s + beta_i (1-s)``: the root
    of the decreasing ``q'(s) = sum a_i^2 N_i / D_i^2``, ``N_i = beta_i (1-s)^2 - r^2 s^2``, by
    Newton with ``q'' = sum a_i^2 (N_i' D_i - 2 N_i D_i') / D_i^3``."""

    def step(s):
        one, col = 1 - s[:, None], s[:, None]
        den, num = r2 * col + beta * one, beta * one**2 - r2 * col**2
        slope = (a2 * num / den**2).sum(-1)
        curvature = (a2 * (-2 * (beta * one + r2 * col) * den - 2 * num * (r2 - beta)) / den**3).sum(-1)
        return slope > 0, s - slope / curvature

    half = torch.full_like(a2[:, 0], 0.5)
    s = _safeguarded_newton(step, torch.zeros_like(half), torch.ones_like(half), half)[:, None]
    return (a2 * s * (1 - s) / (r2 * s + beta * (1 - s))).sum(-1)


def separation(x: Tensor, law: Smoothing, gap: float, stored: Regions) -> Tensor:
    """Per stored region, the factor t by which it and ``E(x, S, gap)`` must both be scaled
    about their centres to touch: ``sqrt(max_s q(s))`` (module notes). The open regions are
    disjoint iff ``t >= 1``; t is 0 for equal centres and infinite if a region is empty."""
    x, law = _query(x, law, stored)
    if not (np.isfinite(gap) and gap >= 0):
        raise RDDRSError(f"gap r must be finite and >= 0, got {gap}")
    if gap == 0:
        return torch.full((len(stored),), torch.inf, dtype=torch.float64, device=x.device)
    t = _chunked(lambda a2, beta: _max_q(a2, beta, float(gap) ** 2).sqrt(), x, law, stored)
    return torch.where(stored.gaps.to(t) > 0, t, torch.inf)


def disjoint(x: Tensor, law: Smoothing, gap: float, stored: Regions) -> Tensor:
    """Whether the open region ``E(x, S, gap)`` misses each stored region (bool, (N,))."""
    return separation(x, law, gap, stored) >= 1


def contains(stored: Regions, x: Tensor) -> Tensor:
    """Whether x lies in each (open) stored region: ``||S_j^-1 (x - c_j)|| < r_j`` (bool, (N,))."""
    x = torch.as_tensor(x).reshape(-1).double()
    if x.numel() != stored.laws.dim:
        raise RDDRSError(f"x has {x.numel()} features, the stored regions d={stored.laws.dim}")
    offset = (x - stored.centres.double())[..., None]
    return _float64(stored.laws).solve(offset).squeeze(-1).norm(dim=-1) < stored.gaps.double()


def gauges(stored: Regions, points: Tensor) -> Tensor:
    """Each point's gauge in each stored region, ``||S_j^-1 (p - c_j)|| / r_j`` ((N, P), float64;
    below 1 inside the open region, infinite for an empty one): one solve with S_j per region."""
    points = torch.as_tensor(points).double().flatten(1)  # (P, d)
    if points.shape[1] != stored.laws.dim:
        raise RDDRSError(f"the points have {points.shape[1]} features, the stored regions d={stored.laws.dim}")
    laws, rows = _float64(stored.laws), []
    for j in range(len(stored)):
        offsets = (points - stored.centres[j].double()).T[None]  # (1, d, P)
        norms = laws.with_param(laws.param[j : j + 1]).solve(offsets)[0].norm(dim=0)
        rows.append(norms / stored.gaps[j] if stored.gaps[j] > 0 else torch.full_like(norms, torch.inf))
    return torch.stack(rows) if rows else torch.zeros(0, len(points), dtype=torch.float64)


def largest_disjoint_radius(x: Tensor, law: Smoothing, stored: Regions) -> Tensor:
    """Per stored region, the largest r with ``E(x, S, r)`` disjoint from it: the distance from
    0 to it in coordinates whitened by S (0 if x is inside, infinite if it is empty)."""
    x, law = _query(x, law, stored)
    r = _chunked(lambda a2, beta: _dual_distance(a2, beta, inward=False), x, law, stored)
    return torch.where(stored.gaps.to(r) > 0, r, torch.inf)


def largest_contained_radius(x: Tensor, law: Smoothing, stored: Regions) -> Tensor:
    """Per stored region, the largest r with ``E(x, S, r)`` inside it: the distance from 0 to
    its boundary in coordinates whitened by S (0 if x is not inside)."""
    x, law = _query(x, law, stored)
    inside = contains(stored, x)
    r = torch.zeros(len(stored), dtype=torch.float64, device=x.device)
    r[inside] = _chunked(lambda a2, beta: _dual_distance(a2, beta, inward=True), x, law, _subset(stored, inside))
    return r


class Decision(NamedTuple):
    """What the memory makes of a certified input: its class, gap and how they came about."""

    label: int
    gap: float
    status: str


class Memory:
    """Certified regions in the order they were stored, all of one smoothing family.

    Before any exact computation a screen on all stored regions (centres as one (N, d) array)
    uses that region j lies in the ball of radius ``r_j lambda_max(S_j)`` about its centre,
    and the query's ``E(x, S, r)`` in the ball of radius ``r lambda_max(S)``: far regions are
    discarded, the others are computed exactly, nearest first, until the bound shows that the
    rest cannot shrink r further. ``screen=False`` computes every region exactly.
    With ``load`` the parameters are not kept: region j's is ``load(key_j)`` when needed
    (for full matrices, 2.4 MB each at d = 784).
    """

    def __init__(self, screen: bool = True, load: Callable[[int], Tensor] | None = None):
        self.screen, self._load = screen, load
        self._template: Smoothing | None = None  # a law of the family, to build batches from
        self._params: list = []  # parameters, or the keys to load them by
        # per region, in rows grown by doubling: centre, its squared norm, class, gap, and
        # r lambda_max(S), the radius of a ball about the centre that holds the region
        self._centres = torch.zeros(0, 0, dtype=torch.float64)
        self._labels = torch.zeros(0, dtype=torch.long)
        self._squares, self._gaps, self._outer = (torch.zeros(0, dtype=torch.float64) for _ in range(3))

    def __len__(self) -> int:
        return len(self._params)

    @property
    def labels(self) -> list[int]:
        return self._labels[: len(self)].tolist()

    @property
    def gaps(self) -> list[float]:
        return self._gaps[: len(self)].tolist()

    def regions(self, index: Tensor | list[int] | None = None) -> Regions:
        """The stored regions (those at the positions ``index``, if given)."""
        if self._template is None:
            raise RDDRSError("the memory is empty")
        index = torch.arange(len(self)) if index is None else torch.as_tensor(index, dtype=torch.long)
        params = [self._load(self._params[j]) if self._load else self._params[j] for j in index.tolist()]
        device = self._centres.device
        return Regions(
            self._centres[index],
            self._template.with_param(torch.stack(params).to(device, torch.float64)),
            self._gaps[index],
        )

    def store(self, x: Tensor, law: Smoothing, gap: float, label: int, key: int | None = None) -> None:
        """Add the region ``E(x, S, gap)`` of class ``label`` (``key``: what ``load`` takes)."""
        if law.batch != 1:
            raise RDDRSError(f"store takes one smoothing law, got a batch of {law.batch}")
        if self._template is not None and type(law) is not type(self._template):
            raise RDDRSError(f"one memory holds one smoothing family: {self._template.family}, not {law.family}")
        if not (np.isfinite(gap) and gap >= 0):
            raise RDDRSError(f"gap r must be finite and >= 0, got {gap}")
        if self._load is not None and key is None:
            raise RDDRSError("a memory that loads parameters needs the key of each stored region")
        x = torch.as_tensor(x).reshape(-1).double()
        if law.dim != x.numel() or (self._template is not None and x.numel() != self._centres.shape[1]):
            raise RDDRSError(f"x has {x.numel()} features, its law d={law.dim}, the memory d={self._centres.shape[1]}")
        n = len(self)
        if self._template is None:
            self._template = law.with_param(law.param.detach())
            self._centres = torch.empty(0, x.numel(), dtype=torch.float64, device=x.device)
        if n == len(self._centres):  # grow every per-region array by doubling
            self._centres, self._squares, self._labels, self._gaps, self._outer = (
                torch.cat([t, torch.empty((max(n, 16),) + t.shape[1:], dtype=t.dtype, device=x.device)])
                for t in (self._centres, self._squares, self._labels, self._gaps, self._outer)
            )
        self._centres[n] = x.to(self._centres.device)
        self._squares[n] = x.square().sum()
        self._labels[n], self._gaps[n] = int(label), float(gap)
        self._outer[n] = float(gap) * float(law.max_scale()[0])
        self._params.append(key if self._load is not None else law.param.detach()[0].double())

    def _distance_floor(self, x: Tensor) -> Tensor:
        """``||c_j - x||`` for all stored centres, rounded down: from ``||c||^2 - 2 c.x + ||x||^2``
        (one pass over the centres) less a bound on its rounding error, so that the screen,
        which only compares it from below, never discards a region it should keep."""
        n, squares = len(self), self._squares[: len(self)]
        sq = squares - 2 * (self._centres[:n] @ x) + x.square().sum()
        slack = 4 * x.numel() * torch.finfo(x.dtype).eps * (squares + x.square().sum())
        return (sq - slack).clamp(min=0).sqrt()

    def decide(self, x: Tensor, law: Smoothing, gap: float, label: int) -> Decision:
        """Class and gap of a certified input given the stored regions ((a) and (b) of the
        module notes); nothing is stored."""
        if not (np.isfinite(gap) and gap > 0):
            raise RDDRSError(f"a certified input needs a gap r > 0, got {gap}")
        if len(self) == 0:
            return Decision(int(label), float(gap), KEPT)
        n = len(self)
        x = torch.as_tensor(x).reshape(-1).double().to(self._centres.device)
        law = _float64(law)
        other = (self._labels[:n] != label) & (self._gaps[:n] > 0)
        distance = self._distance_floor(x)
        outer = self._outer[:n]
        stored_full = self._template.dense
        # (a) inside a stored region of another class: the first such region (stored order)
        candidates = (other & (distance < outer) if self.screen else other).nonzero()[:, 0]
        for part in _chunks(len(candidates), law.dim, stored_full):
            inside = contains(self.regions(candidates[part]), x).nonzero()[:, 0]
            if len(inside):
                j = int(candidates[part][inside[0]])
                r = float(largest_contained_radius(x, law, self.regions([j]))[0])
                return Decision(int(self._labels[j]), r * (1 - TOUCH_TOLERANCE), RELABELLED)
        # (b) shrink against the stored regions of other classes; E(x, S, lower_j) misses region j
        lower = (distance - outer) / float(law.max_scale()[0])
        near = other & (lower < gap) if self.screen else other
        order = near.nonzero()[:, 0][lower[near].argsort()]  # nearest first, by the bound
        limit = float(gap)
        for part in _chunks(len(order), law.dim, stored_full or law.dense):
            index = order[part][lower[order[part]] < limit] if self.screen else order[part]
            if len(index):
                limit = min(limit, float(largest_disjoint_radius(x, law, self.regions(index)).min()))
        if limit < gap:
            return Decision(int(label), limit * (1 - TOUCH_TOLERANCE), SHRUNK)
        return Decision(int(label), float(gap), KEPT)

    def admit(self, x: Tensor, law: Smoothing, gap: float, label: int, key: int | None = None) -> Decision:
        """``decide``, then store the input's region with the decided class and gap."""
        decision = self.decide(x, law, gap, label)
        self.store(x, law, decision.gap, decision.label, key)
        return decision
