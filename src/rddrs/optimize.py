"""Per-input search of the smoothing law (DDRS, ANCER, RDDRS), batched over inputs.

All three maximise, for each input separately, the soft certificate

    H(S) = scale * R(S) * (P(S) + kappa K(S)),
    R = Phi^-1(G_A) - Phi^-1(G_B),   P = det(S)^(1/d),   K = lambda_min(S),

where ``G = E[softmax f(x + S eps)]`` is estimated from fresh draws at every iteration. They
differ only by the family of S and the step rule:

* DDRS (Alfarra et al.): ``S = sigma I``, ``H = sigma R / 2``, gradient ascent on sigma,
  best iterate kept at checkpoints;
* ANCER (Eiras et al.): ``S = diag(theta)``, Adam on theta, projection ``theta >= sigma_x*``;
* RDDRS: ``S = C`` SPD, ascent ``C <- Exp_C(lr grad H)`` with the Riemannian gradient of the
  affine-invariant metric, eigenvalues floored at ``sigma_x*``.

One forward and one backward pass per iteration: R and its Euclidean gradient with respect
to S come from the same draws (the chain rule through ``x + S eps`` gives the estimator
``E[grad f(y) eps^T]`` of the paper for both classes at once); the gradients of P and K are in
closed form (``Smoothing.grad_proxy``, ``Smoothing.grad_min_scale``). No probability is
clamped (see ``rddrs.stats.soft_gap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from rddrs import RDDRSError
from rddrs.noise import Isotropic, NoiseSource, Smoothing, check_inputs, noisy_outputs
from rddrs.stats import soft_gap


@dataclass(frozen=True)
class Search:
    """Settings of one per-input search: H = scale * R * (P + kappa K), ``iterations`` steps of
    size ``lr`` (Adam if ``adam``), ``samples`` draws per step, and, if ``keep_best_every``,
    the best of the iterates at every that many steps instead of the last one.

    ``max_step`` bounds each step: no scale of S changes by more than a factor
    ``exp(max_step)`` (RDDRS: whitened spectral norm, ``spd.exp``) or ``1 + max_step``
    (sigma, theta). It is our safeguard, not the papers': with few samples the Monte Carlo
    gradient is noisy, and a fixed-size Riemannian step ``C grad C`` grows with C, so an
    unbounded RDDRS ascent can run away along one direction (seen at 500 samples, lr 1).

    Options for studying the search (defaults: the papers' behaviour):

    * ``floor``: ANCER and RDDRS keep every scale of S above sigma_x*. With False only the
      positivity guard ``DDRS_FLOOR`` remains (the exponential map keeps C SPD by itself, so
      for RDDRS it only guards against underflow; for theta it is the projection that keeps
      DDRS' sigma positive).
    * ``antithetic``: the ``samples`` draws of each step are ``samples / 2`` antithetic pairs
      ``(eps, -eps)`` (``NoiseSource.draw``); the Monte Carlo means stay unbiased, and their
      odd-order noise in eps cancels exactly.
    * ``repeat``: which independent replicate of the optimisation noise to draw (0: the usual
      stream); the certification noise and sigma_x* do not change with it.
    """

    iterations: int
    samples: int
    lr: float
    kappa: float = 0.0
    scale: float = 1.0
    adam: bool = False
    keep_best_every: int | None = None
    max_step: float | None = None
    floor: bool = True
    antithetic: bool = False
    repeat: int = 0

    def __post_init__(self):
        if self.iterations < 0 or self.samples < 1:
            raise RDDRSError(f"a search needs iterations >= 0 and samples >= 1, got {self.iterations}, {self.samples}")
        if not self.lr > 0:
            raise RDDRSError(f"learning rate must be > 0, got {self.lr}")
        if self.kappa < 0:
            raise RDDRSError(f"kappa must be >= 0, got {self.kappa}")
        if self.max_step is not None and not self.max_step > 0:
            raise RDDRSError(f"max_step must be > 0 (or None), got {self.max_step}")
        if self.antithetic and self.samples % 2:
            raise RDDRSError(f"antithetic pairs need an even number of samples, got {self.samples}")
        if int(self.repeat) != self.repeat or self.repeat < 0:
            raise RDDRSError(f"repeat must be an integer >= 0, got {self.repeat}")


# The papers' settings (RDDRS paper, Section 4).
DDRS = Search(iterations=1500, samples=100, lr=1e-4, scale=0.5, keep_best_every=100)
ANCER = Search(iterations=100, samples=100, lr=0.04, kappa=2.0, adam=True)
RDDRS = Search(iterations=100, samples=20_000, lr=1.0, kappa=1e-6)

#: sigma is kept above this during DDRS' search (only to keep the scale positive); so are the
#: scales of ANCER and RDDRS searches without the sigma_x* floor (``Search.floor=False``).
DDRS_FLOOR = 1e-3


@dataclass
class SearchResult:
    """The chosen smoothing laws and the objective H per input (rows) and iteration (columns)."""

    smoothing: Smoothing
    trace: np.ndarray


class _Adam:
    """Adam ascent directions, elementwise, hence independent across inputs."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = self.v = 0.0

    def __call__(self, grad: Tensor) -> Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)


def objective_and_gradient(model, x: Tensor, smoothing: Smoothing, eps: Tensor, kappa: float,
                           scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """H per input (float64, (B,)) and its gradient in the family's geometry, from draws eps."""
    leaf = smoothing.leaf()
    log_probs = torch.log_softmax(noisy_outputs(model, x, leaf, eps), -1)
    gap, _ = soft_gap(log_probs)
    (d_gap,) = torch.autograd.grad(gap.sum(), leaf.param)
    gap = gap.detach()
    weight = smoothing.proxy().double() + kappa * smoothing.min_scale().double()
    like = smoothing.param
    grad = (smoothing.expand(weight.to(like)) * smoothing.ascent_direction(d_gap)
            + smoothing.expand(gap.to(like)) * (smoothing.grad_proxy() + kappa * smoothing.grad_min_scale()))
    return scale * gap * weight, scale * grad


def search(model, x: Tensor, init: Smoothing, indices, settings: Search, lower, seed: int,
           rotation: Tensor | None = None, progress: bool = False) -> SearchResult:
    """Maximise H for each input from ``init``, keeping ``lambda_min(S) >= lower``.

    ``lower`` is a number or one per input. Draws come from the optimisation stream of
    ``seed`` keyed by ``indices`` (replicate ``settings.repeat``, antithetic pairs if
    ``settings.antithetic``), independent of the certification streams. Memory grows
    with ``len(indices) * settings.samples`` (the whole iteration is one autograd graph).
    """
    check_inputs(x, init, indices)
    noise = NoiseSource(seed, NoiseSource.OPTIMIZE, x.device, rotation, repeat=settings.repeat)
    direction = _Adam(settings.lr) if settings.adam else (lambda g: settings.lr * g)
    current = init.floor(lower)
    best, best_value = current, torch.full((len(indices),), -np.inf, dtype=torch.float64, device=x.device)
    trace = []
    for t in tqdm(range(settings.iterations), disable=not progress, desc="search", leave=False):
        eps = noise.draw(indices, settings.samples, init.dim, x.dtype, antithetic=settings.antithetic)
        value, grad = objective_and_gradient(model, x, current, eps, settings.kappa, settings.scale)
        trace.append(value)
        if settings.keep_best_every and (t + 1) % settings.keep_best_every == 0:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best = best.with_param(torch.where(current.expand(better), current.param, best.param))
        current = current.step(direction(grad), settings.max_step).floor(lower)
    chosen = best if settings.keep_best_every and settings.iterations >= settings.keep_best_every else current
    trace = torch.stack(trace, 1).cpu().numpy() if trace else np.zeros((len(indices), 0))
    return SearchResult(chosen, trace)


METHODS = ("rs", "ddrs", "ancer", "rddrs")


def find_smoothing(method: str, model, x: Tensor, indices, sigma: float, seed: int,
                   settings: dict[str, Search] | None = None, sigma_star: Tensor | None = None,
                   rotation: Tensor | None = None, progress: bool = False) -> tuple[Smoothing, dict[str, np.ndarray]]:
    """The smoothing law of each input for ``method``, and the objective traces of its searches.

    RS uses ``sigma`` itself; DDRS searches sigma from ``sigma``; ANCER and RDDRS start from
    the DDRS optimum ``sigma_star`` (searched here unless given) with floor ``sigma_star``
    (``DDRS_FLOOR`` if their search has ``floor=False``).
    ``settings`` overrides the papers' settings per method (keys "ddrs", "ancer", "rddrs").
    """
    if method not in METHODS:
        raise RDDRSError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not sigma > 0:
        raise RDDRSError(f"sigma must be > 0, got {sigma}")
    settings = {"ddrs": DDRS, "ancer": ANCER, "rddrs": RDDRS, **(settings or {})}
    d = x[0].numel()
    base = Isotropic(torch.full((len(indices),), float(sigma), dtype=x.dtype, device=x.device), d)
    if method == "rs":
        return base, {}
    traces = {}
    if sigma_star is None:
        ddrs = search(model, x, base, indices, settings["ddrs"], DDRS_FLOOR, seed, rotation, progress)
        sigma_star, traces["ddrs"] = ddrs.smoothing.param, ddrs.trace
    star = Isotropic(torch.as_tensor(sigma_star, dtype=x.dtype, device=x.device), d)
    if method == "ddrs":
        return star, traces
    init = star.as_diagonal() if method == "ancer" else star.as_full()
    lower = star.param if settings[method].floor else DDRS_FLOOR
    found = search(model, x, init, indices, settings[method], lower, seed, rotation, progress)
    traces[method] = found.trace
    return found.smoothing, traces
