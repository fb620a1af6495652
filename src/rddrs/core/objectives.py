"""The soft certificate R that the searches maximise, in three readings.

Every search estimates the smoothed soft classifier ``G = E[softmax f(x + S eps)]`` from m
draws (``stats.ClassMeans``: A and B are its two largest classes) and maximises
``H = scale * R * (P + kappa K)``. The readings differ in R only:

* ``soft``: ``R = Phi^-1(G_A) - Phi^-1(G_B)``, never clamped (``stats.soft_gap``).
* ``clamped``: what the authors' public code computes (``methods.Method.clamp``): G_A and G_B
  clamped to ``[low, high]`` before ``Phi^-1``. DDRS (0.02, 0.98) and ANCER (0.001, 0.999)
  differentiate through the clamp, so a confident input has ``dR = 0``: only ``R grad P``
  moves S, and every such input grows at the same rate. RDDRS (0.001, 0.999) writes its
  gradient by hand, ``dR = dG_A / phi(Phi^-1(c_A)) - dG_B / phi(Phi^-1(c_B))`` with the
  clamped ``c``: the value is capped (``R <= 2 Phi^-1(0.999) = 6.18``) but the shape term
  stays.
* ``capped``: the soft R limited smoothly at the largest gap the run's own certification
  can give, ``r_max = Phi^-1(alpha^(1/n))`` (``stats.gap_cap``). On the certificate's scale
  ``g = R / 2`` (CERTIFY's gap when ``p_B = 1 - p_A``),

      g_cap = -tau log(exp(-g / tau) + exp(-r_max / tau)),   dg_cap/dg = sigmoid((r_max - g) / tau),

  so ``R_cap = 2 g_cap`` and ``dR_cap = sigmoid((r_max - R/2) / tau) dR``. Below the cap it is
  the soft R; above it, growing S costs nothing until the certificate would fall below the
  cap, where the soft R kept rewarding gaps that n samples can never certify. ``tau = 0.4``
  makes ``g_cap`` follow CERTIFY's expected gap ``E_k[Phi^-1(p_lower(k))]``,
  ``k ~ Bin(n, Phi(g))``, within 0.07 at n = 10^4 and 0.05 at n = 10^5 (alpha = 10^-3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.methods import Clamp
from rddrs.core.stats import ClassMeans, soft_gap_of

#: temperature of the capped objective's smooth minimum, on the certificate's gap scale
CAP_TEMPERATURE = 0.4

_SQRT_2PI = math.sqrt(2 * math.pi)


class Soft:
    """``R = Phi^-1(G_A) - Phi^-1(G_B)``, no clamp."""

    def __call__(self, means: ClassMeans) -> Tensor:
        return soft_gap_of(means)


class Clamped:
    """R of the authors' code: ``Phi^-1(clamp(G_A)) - Phi^-1(clamp(G_B))`` (see the module)."""

    def __init__(self, clamp: Clamp):
        self.clamp = clamp

    def __call__(self, means: ClassMeans) -> Tensor:
        low, high = self.clamp.low, self.clamp.high
        g_a, g_b = means.log_g_top.exp(), means.log_g_runner_up.exp()
        if self.clamp.slope == "autograd":
            return torch.special.ndtri(g_a.clamp(low, high)) - torch.special.ndtri(g_b.clamp(low, high))
        value = torch.zeros_like(g_a)
        for sign, g in ((1.0, g_a), (-1.0, g_b)):
            z = torch.special.ndtri(g.detach().clamp(low, high))
            slope = _SQRT_2PI * torch.exp(0.5 * z * z)  # 1 / phi(z)
            value = value + sign * (z + (g - g.detach()) * slope)
        return value


class Capped:
    """The soft R limited smoothly at ``2 r_max`` (see the module)."""

    def __init__(self, cap: float, temperature: float = CAP_TEMPERATURE):
        self.cap, self.temperature = float(cap), float(temperature)

    def __call__(self, means: ClassMeans) -> Tensor:
        tau = self.temperature
        half = 0.5 * soft_gap_of(means)
        return -2 * tau * torch.logaddexp(-half / tau, torch.full_like(half, -self.cap / tau))


def build(name: str, clamp: Clamp | None = None, cap: float | None = None):
    """The objective ``name``: ``clamped`` with ``clamp``, the searched method's
    (``methods.Method.clamp``); ``capped`` with ``cap``, the run's ``r_max``."""
    if name == "soft":
        return Soft()
    if name == "clamped":
        if clamp is None:
            raise RDDRSError("the clamped objective needs the clamp of the searched method (its authors' code)")
        return Clamped(clamp)
    if name == "capped":
        if cap is None:
            raise RDDRSError("the capped objective needs the cap of the run's certification (n and alpha)")
        return Capped(cap)
    raise RDDRSError(f"unknown objective {name!r}; expected soft, clamped or capped")
