"""Statistics of the smoothed classifier: confidence bounds and a numerically stable probit.

* ``clopper_pearson_lower(k, n, alpha)``: one-sided lower bound ``B^-1(alpha; k, n-k+1)`` on a
  binomial proportion, holding with probability at least ``1 - alpha``.
* ``binomial_p_value(k, n)``: two-sided p-value of ``k`` successes in ``n`` fair coin flips
  (Cohen et al.'s PREDICT abstains when it exceeds alpha).
* ``probit_of_log(log p)``, ``class_means(log_probs)`` and ``soft_gap(log_probs)``: the soft
  certificate ``R = Phi^-1(G_A) - Phi^-1(G_B)`` of the optimisers, computed from per-sample
  log-probabilities without ever clamping a probability.
* ``gap_cap(n, alpha)``: the largest gap n estimation samples can certify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` lower confidence bound on p from k successes in n trials."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe_k = np.maximum(k, 1.0)  # the Beta law needs a > 0; k = 0 gives the bound 0
    # the quantile of Beta(k, n - k + 1); scipy.special is a fraction of scipy.stats' import time
    return np.where(k > 0, special.betaincinv(safe_k, n - k + 1, alpha), 0.0)


def binomial_p_value(k, n) -> np.ndarray:
    """Two-sided p-value of ``k >= n/2`` successes in n fair trials: ``min(1, 2 P(X >= k))``."""
    from scipy import stats  # only PREDICT needs it; certification runs start without it

    k, n = np.asarray(k), np.asarray(n)
    return np.minimum(1.0, 2.0 * stats.binom.sf(k - 1, n, 0.5))


def _log_pdf(x: Tensor) -> Tensor:
    return -0.5 * x * x - _LOG_SQRT_2PI


def probit_of_log(log_p: Tensor) -> Tensor:
    """``Phi^-1(exp(log_p))`` in float64, for any ``log_p <= 0``, with its exact derivative.

    The value comes from ``ndtri`` where ``exp(log_p)`` is a normal float64 and from Newton
    steps on ``log Phi(x) = log_p`` below (far tails). The gradient is attached through the
    implicit function theorem: ``dx / dlog_p = Phi(x) / phi(x)``.
    """
    log_p64 = log_p.double()
    with torch.no_grad():
        near_one = log_p64 > -math.log(2.0)  # there 1 - p is the accurate quantity
        x = torch.where(near_one, -torch.special.ndtri(-torch.expm1(log_p64)), torch.special.ndtri(log_p64.exp()))
        far = log_p64 < -700.0
        if far.any():
            t = -2.0 * log_p64[far]
            z = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))  # asymptotic start
            for _ in range(6):
                z = z - (torch.special.log_ndtr(z) - log_p64[far]) * torch.exp(torch.special.log_ndtr(z) - _log_pdf(z))
            x = x.masked_scatter(far, z)
        slope = torch.exp(torch.special.log_ndtr(x) - _log_pdf(x))
        slope = torch.where(torch.isfinite(slope), slope, 0.0)  # p = 1: x = inf, no gradient
    return x + (log_p64 - log_p64.detach()) * slope


def _log_mean_exp(a: Tensor, dim: int) -> Tensor:
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


@dataclass
class ClassMeans:
    """The smoothed soft classifier ``G = mean_i softmax f(y_i)`` of m draws, in log space.

    ``log_g`` (B, K): ``log G_c``; ``log_tail`` (B,): ``log(1 - G_A)`` averaged from the
    per-sample complements ``log(1 - p_A(y_i)) = logsumexp_{c != A} log p_c(y_i)``, exact
    where ``G_A`` rounds to 1; ``top``, ``runner_up``: the classes A and B (largest two G).
    Every quantity is a mean over the draws, so each objective built on them is a function
    ``h(G)`` of means (what the control variate of ``rddrs.core.optimize`` relies on).
    """

    log_g: Tensor
    log_tail: Tensor
    top: Tensor
    runner_up: Tensor

    @property
    def log_g_top(self) -> Tensor:
        return self.log_g.gather(1, self.top[:, None]).squeeze(1)

    @property
    def log_g_runner_up(self) -> Tensor:
        return self.log_g.gather(1, self.runner_up[:, None]).squeeze(1)


def class_means(log_probs: Tensor) -> ClassMeans:
    """``ClassMeans`` of per-sample log-probabilities (B, m, K), in float64."""
    lp = log_probs.double()
    log_g = _log_mean_exp(lp, 1)
    order = log_g.detach().topk(2, dim=-1).indices
    a, b = order[:, 0], order[:, 1]
    is_a = torch.nn.functional.one_hot(a, lp.shape[-1]).bool()[:, None, :]
    log_tail = _log_mean_exp(torch.logsumexp(lp.masked_fill(is_a, -math.inf), -1), 1)
    return ClassMeans(log_g, log_tail, a, b)


def soft_gap_of(means: ClassMeans) -> Tensor:
    """``R = Phi^-1(G_A) - Phi^-1(G_B) = -Phi^-1(1 - G_A) - Phi^-1(G_B)``, never clamped."""
    return -probit_of_log(means.log_tail) - probit_of_log(means.log_g_runner_up)


def soft_gap(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Soft certificate ``R = Phi^-1(G_A) - Phi^-1(G_B)`` and the top class A, per input.

    ``log_probs`` (B, m, K) are per-sample log-probabilities of the base classifier under m
    noise draws; ``G = mean`` of the probabilities, A and B its two largest classes.

    No probability is clamped. ``Phi^-1(G_A) = -Phi^-1(1 - G_A)`` and ``1 - G_A`` is averaged
    from the per-sample complements (``ClassMeans``), so a confident input (``G_A`` within
    1e-20 of 1, say) keeps a finite gap and an informative gradient. A clamp such as
    ``G_A <= 0.98`` would instead make R constant, and its gradient zero, for every confident
    input, so that they would all receive the same smoothing parameter.
    """
    means = class_means(log_probs)
    return soft_gap_of(means), means.top


def gap_cap(n: int, alpha: float) -> float:
    """The largest gap CERTIFY can give with n estimation samples at level alpha:
    ``Phi^-1(alpha^(1/n))``, the gap of ``p_A_lower`` when all n draws vote for A."""
    return float(special.ndtri(alpha ** (1.0 / n)))
