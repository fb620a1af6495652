"""An empirical attack on certified regions (projected gradient ascent, as in SmoothAdv).

A certificate for input x, class c and gap r states that the smoothed classifier keeps
``P[f(z + S eps) = c] > 1/2`` at every point ``z = x + S u`` with ``||u|| < r``. The attack
looks for a counter-example: it maximises the loss of the smoothed soft classifier

    L(u) = -log E_eps[softmax(f(x + S u + S eps))_c]

over the ball ``||u|| <= r`` (the ellipsoid parametrised by u, so the projection is onto a
ball). Each of the K steps moves u by ``step * r`` along its normalised Monte Carlo gradient
(m fresh draws, from the ``attack`` check stream), then projects back onto the ball. With
``box=(lo, hi)`` (isotropic laws) the points must also be images, ``lo <= x + sigma u <= hi``:
each step clips the point to the box, then pulls it back into the ball along the segment
towards x, which stays in both (x lies in the box, and both sets are convex).
``check_region`` then estimates ``P[c]`` at the point found with many independent draws and
calls the certificate refuted when a one-sided exact test rejects ``P[c] >= 1/2``.

The law at the attacked point is the law certified at x (``S`` fixed): this checks the
certificate as stated, not a method that would re-optimise S at the new point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.noise import Smoothing, check_inputs, noisy_outputs
from rddrs.core.stats import clopper_pearson_lower
from rddrs.studies.validity import CheckNoise, class_indices, smoothed_probability


def smoothed_loss(model, x: Tensor, smoothing: Smoothing, cls: Tensor, u: Tensor, eps: Tensor) -> Tensor:
    """``-log mean_j softmax(f(x + S (u + eps_j)))_c`` per input (B,), from draws eps (B, m, d);
    computed in log space, so its gradient survives a saturated softmax."""
    log_probs = torch.log_softmax(noisy_outputs(model, x, smoothing, u[:, None, :] + eps), -1)
    if int(cls.max()) >= log_probs.shape[-1]:
        raise RDDRSError(f"cls must lie in [0, {log_probs.shape[-1]}), got {int(cls.max())}")
    log_pc = log_probs.gather(-1, cls.view(-1, 1, 1).expand(-1, eps.shape[1], 1)).squeeze(-1)
    return math.log(eps.shape[1]) - torch.logsumexp(log_pc, 1)


def _radii(r, x: Tensor) -> Tensor:
    """``r`` (a number or one per input) as a (B,) tensor, or RDDRSError unless finite and >= 0."""
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device)
    if r.dim() > 1 or (r.dim() == 1 and len(r) != len(x)):
        raise RDDRSError(f"r must be a number or have shape ({len(x)},), got {tuple(r.shape)}")
    if not (torch.isfinite(r).all() and (r >= 0).all()):
        raise RDDRSError("r must be finite and >= 0")
    return r.expand(len(x))


def _project(u: Tensor, r: Tensor) -> Tensor:
    """Nearest point of the ball ``||u|| <= r`` (per row)."""
    norm = u.norm(dim=1)
    return u * torch.where(norm > r, r / norm, torch.ones_like(norm))[:, None]


def _into_box(x: Tensor, sigma: Tensor, u: Tensor, r: Tensor, box: tuple[float, float]) -> Tensor:
    """u moved so that ``x + sigma u`` lies in the box and ``||u|| <= r``: the point clipped to the
    box, then its u shortened towards 0 (x itself is in the box)."""
    flat = x.reshape(len(x), -1)
    clipped = (flat + sigma[:, None] * u).clamp(*box)
    return _project((clipped - flat) / sigma[:, None], r)


def attack(
    model,
    x: Tensor,
    smoothing: Smoothing,
    cls,
    r,
    steps: int = 20,
    samples: int = 64,
    step: float | None = None,
    seed: int = 0,
    indices=None,
    box: tuple[float, float] | None = None,
) -> Tensor:
    """Points ``x + S u``, ``||u|| <= r``, that maximise the smoothed loss of class ``cls``.

    ``r`` is a number or one per input; ``step`` is the step length as a fraction of r
    (default ``2.5 / steps``: the path can cross the ball and come back). Starts at u = 0.
    ``box``: the points must lie in ``[lo, hi]^d`` too (an isotropic law, x inside the box).
    Memory grows with ``B * samples`` (one autograd graph per step).
    """
    indices = list(range(len(x))) if indices is None else indices
    check_inputs(x, smoothing, indices)
    if int(steps) != steps or steps < 0 or int(samples) != samples or samples < 1:
        raise RDDRSError(f"an attack needs steps >= 0 and samples >= 1 (integers), got {steps}, {samples}")
    step = 2.5 / max(steps, 1) if step is None else step
    if not step > 0:
        raise RDDRSError(f"step must be > 0, got {step}")
    r = _radii(r, x)
    if box is not None:
        if not smoothing.scalar:
            raise RDDRSError(f"an attack kept to a box takes an isotropic law, not a {smoothing.family} one")
        if not (box[0] < box[1] and ((x >= box[0]) & (x <= box[1])).all()):
            raise RDDRSError(f"the inputs must lie in the box [{box[0]:g}, {box[1]:g}] the points are kept to")
    cls = torch.as_tensor(class_indices(cls, len(x)), device=x.device)
    noise = CheckNoise(seed, CheckNoise.ATTACK, x.device)
    u = torch.zeros(len(x), smoothing.dim, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        for _ in range(steps):
            eps = noise.draw(indices, samples, smoothing.dim, x.dtype)
            u.requires_grad_(True)
            (grad,) = torch.autograd.grad(smoothed_loss(model, x, smoothing, cls, u, eps).sum(), u)
            direction = grad / grad.norm(dim=1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
            u = _project(u.detach() + (step * r)[:, None] * direction, r)
            if box is not None:
                u = _into_box(x, smoothing.param, u, r, box)
    return smoothing.scale_noise(u[:, None, :], offset=x.reshape(len(x), 1, -1)).reshape(x.shape)


@dataclass
class RegionCheck:
    """Outcome of ``check_region`` per input (numpy arrays of length B, ``points`` a tensor).

    ``p``: estimated ``P[c]`` at the attacked point; ``high``: its one-sided ``1 - alpha``
    upper bound; ``refuted``: ``high < 1/2`` (the certificate's claim ``P[c] > 1/2`` is
    rejected at level alpha); ``winner``: the most frequent class at the point.
    """

    points: Tensor
    p: np.ndarray
    high: np.ndarray
    refuted: np.ndarray
    winner: np.ndarray


def check_region(
    model,
    x: Tensor,
    smoothing: Smoothing,
    cls,
    r,
    steps: int = 20,
    samples: int = 64,
    step: float | None = None,
    check_samples: int = 10_000,
    alpha: float = 0.001,
    seed: int = 0,
    indices=None,
    batch_size: int = 10_000,
) -> RegionCheck:
    """Attack the region ``{x + S u : ||u|| < r}`` certified for class ``cls`` and test the
    smoothed prediction at the point found with ``check_samples`` independent draws."""
    points = attack(model, x, smoothing, cls, r, steps, samples, step, seed, indices)
    found = smoothed_probability(model, points, smoothing, None, check_samples, seed, batch_size, alpha, indices)
    rows = np.arange(len(x))
    cls = class_indices(cls, len(x), found.count.shape[1])
    count = found.count[rows, cls]
    high = 1.0 - clopper_pearson_lower(check_samples - count, check_samples, alpha)
    return RegionCheck(points=points, p=found.p[rows, cls], high=high, refuted=high < 0.5, winner=found.count.argmax(1))
