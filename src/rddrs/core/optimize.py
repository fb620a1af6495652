"""Per-input search of the smoothing law (DDRS, ANCER, RDDRS), batched over inputs.

All three maximise, for each input separately, the soft certificate

    H(S) = scale * R(S) * (P(S) + kappa K(S)),
    R = Phi^-1(G_A) - Phi^-1(G_B),   P = det(S)^(1/d),   K = lambda_min(S),

where ``G = E[softmax f(x + S eps)]`` is estimated from fresh draws at every iteration. One
loop serves the three methods; they differ by the family of S, the reading of R
(``rddrs.core.objectives``: soft, clamped, capped) and the step rule (``rddrs.core.steps``: sgd, adam),
each set by the method's ``Search`` (``rddrs.core.presets``). The papers' own searches:

* DDRS (Alfarra et al.): ``S = sigma I``, ``H = sigma R / 2``, gradient ascent on sigma,
  best iterate kept at checkpoints;
* ANCER (Eiras et al.): ``S = diag(theta)``, Adam on theta, projection ``theta >= sigma_x*``;
* RDDRS: ``S = C`` SPD, ascent ``C <- Exp_C(lr grad H)`` with the Riemannian gradient of the
  affine-invariant metric, eigenvalues floored at ``sigma_x*``.

One forward and one backward pass per iteration: R and its Euclidean gradient with respect
to S come from the same draws (the chain rule through ``x + S eps`` gives the estimator
``E[grad f(y) eps^T]`` of the paper for both classes at once); the gradients of P and K are in
closed form (``Smoothing.grad_proxy``, ``Smoothing.grad_min_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from rddrs import RDDRSError
from rddrs.core import objectives, spd, steps
from rddrs.core.methods import Clamp, method as method_record
from rddrs.core.noise import Isotropic, NoiseSource, Smoothing, check_inputs, family_class, noisy_outputs
from rddrs.core.presets import ANCER, DDRS, RDDRS, Search
from rddrs.core.stats import ClassMeans, class_means

#: the papers' own searches, by method (what ``find_smoothing`` runs unless told otherwise)
PAPER_SEARCHES = {"ddrs": DDRS, "ancer": ANCER, "rddrs": RDDRS}

#: sigma is kept above this during DDRS' search (only to keep the scale positive); so are the
#: scales of ANCER and RDDRS searches without the sigma_x* floor (``Search.floor=False``).
DDRS_FLOOR = 1e-3


@dataclass
class SearchResult:
    """The chosen smoothing laws, the objective H per input (rows) and iteration (columns; NaN
    after a search stopped), and per input the iteration whose step overflowed (0: none)."""

    smoothing: Smoothing
    trace: np.ndarray
    diverged_at: np.ndarray


def objective_and_gradient(
    model,
    x: Tensor,
    smoothing: Smoothing,
    eps: Tensor,
    kappa: float,
    scale: float = 1.0,
    objective=None,
    control_variate: bool = False,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """H per input (float64, (B,)) and its gradient in the family's geometry, from draws eps.

    ``objective`` reads R from the class means (``rddrs.core.objectives``; default: soft). R depends
    on the draws through means only, so its gradient is ``sum_i J_S(eps_i)^T grad psi(y_i)``
    for one function psi of a noisy input (``_psi``) whose weights come from the means.

    * ``chunk``: draws go through the network this many at a time: the means first (no
      gradient), then the gradient of ``sum_i psi(y_i)`` chunk by chunk; the memory is that of
      one chunk, the result that of all draws at once (one more forward pass per draw).
    * ``control_variate``: subtract ``sum_i J_S(eps_i)^T grad psi(x)``, the same sum at the
      clean input, whose mean is 0 because ``E[eps] = 0``: the part of the Monte Carlo noise
      that is linear in eps goes.
    """
    objective = objective or objectives.Soft()
    m = eps.shape[1]
    if chunk is None or chunk >= m:
        leaf = smoothing.leaf()
        means = class_means(torch.log_softmax(noisy_outputs(model, x, leaf, eps), -1))
        gap = objective(means)
        (d_gap,) = torch.autograd.grad(gap.sum(), leaf.param)
        gap = gap.detach()
        if control_variate:
            weights = _psi_weights(objective, means)[1]
    else:
        parts = [slice(i, i + chunk) for i in range(0, m, chunk)]
        with torch.no_grad():
            means = class_means(
                torch.cat(
                    [torch.log_softmax(noisy_outputs(model, x, smoothing, eps[:, part]), -1) for part in parts], 1
                )
            )
        gap, weights = _psi_weights(objective, means)
        d_gap = 0
        for part in parts:
            leaf = smoothing.leaf()
            psi = _psi(torch.log_softmax(noisy_outputs(model, x, leaf, eps[:, part]), -1), means, weights, m)
            d_gap = d_gap + torch.autograd.grad(psi.sum(), leaf.param)[0]
    if control_variate:
        d_gap = d_gap - _clean_input_term(model, x, smoothing, eps, means, weights)
    weight = smoothing.proxy().double() + kappa * smoothing.min_scale().double()
    like = smoothing.param
    grad = smoothing.expand(weight.to(like)) * smoothing.ascent_direction(d_gap) + smoothing.expand(gap.to(like)) * (
        smoothing.grad_proxy() + kappa * smoothing.grad_min_scale()
    )
    return scale * gap * weight, scale * grad


def _psi_weights(objective, means: ClassMeans) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """R at the means, and its derivatives ``w = dR / dlog G`` (B, K), ``w_t = dR / dlog(1 - G_A)`` (B,)."""
    log_g, log_tail = means.log_g.detach().requires_grad_(True), means.log_tail.detach().requires_grad_(True)
    with torch.enable_grad():
        gap = objective(ClassMeans(log_g, log_tail, means.top, means.runner_up))
        w_g, w_tail = torch.autograd.grad(gap.sum(), [log_g, log_tail], allow_unused=True)
    return gap.detach(), (
        torch.zeros_like(log_g) if w_g is None else w_g,
        torch.zeros_like(log_tail) if w_tail is None else w_tail,
    )


def _psi(log_probs: Tensor, means: ClassMeans, weights: tuple[Tensor, Tensor], m: int) -> Tensor:
    """``sum_i psi(y_i)`` per input for per-sample log-probabilities (B, n, K) of some of the m draws,
    ``psi(y) = (1/m) [sum_c w_c p_c(y) / G_c + w_t (1 - p_A(y)) / (1 - G_A)]``: its gradient at
    each draw is the draw's share of ``dR``."""
    w_g, w_tail = weights
    lp = log_probs.double()
    is_a = torch.nn.functional.one_hot(means.top, lp.shape[-1]).bool()[:, None, :]
    log_tail = torch.logsumexp(lp.masked_fill(is_a, -float("inf")), -1)
    per_class = (w_g[:, None, :] * (lp - means.log_g.detach()[:, None, :]).exp()).sum(-1)
    return (per_class + w_tail[:, None] * (log_tail - means.log_tail.detach()[:, None]).exp()).sum(1) / m


def _clean_input_term(
    model, x: Tensor, smoothing: Smoothing, eps: Tensor, means: ClassMeans, weights: tuple[Tensor, Tensor]
) -> Tensor:
    """``sum_i J_S(eps_i)^T grad psi(x)``: the gradient with respect to S of
    ``<grad psi(x), S sum_i eps_i>``, the control variate's term."""
    clean = x.detach().requires_grad_(True)
    with torch.enable_grad():
        psi = _psi(torch.log_softmax(model(clean), -1)[:, None, :], means, weights, eps.shape[1])
        (direction,) = torch.autograd.grad(psi.sum(), clean)
        leaf = smoothing.leaf()
        sum_eps = eps.sum(1, keepdim=True)
        linear = (leaf.scale_noise(sum_eps) * direction.reshape(len(x), 1, -1).to(sum_eps)).sum()
        return torch.autograd.grad(linear, leaf.param)[0]


def search(
    model,
    x: Tensor,
    init: Smoothing,
    indices,
    settings: Search,
    lower,
    seed: int,
    rotation: Tensor | None = None,
    progress: bool = False,
    clamp: Clamp | None = None,
) -> SearchResult:
    """Maximise H for each input from ``init``, keeping ``lambda_min(S) >= lower``.

    ``clamp``: the searched method's (``methods.Method.clamp``), which the ``clamped``
    objective needs.

    ``lower`` is a number or one per input. Draws come from the optimisation stream of
    ``seed`` keyed by ``indices`` (replicate ``settings.repeat``, antithetic pairs if
    ``settings.antithetic``), independent of the certification streams. Memory grows
    with ``len(indices) * settings.samples`` (the whole iteration is one autograd graph).

    An input whose step overflows (too large a step size: its gradient or its next law is not
    finite, or numerically singular, see ``_overflowed``) stops there and keeps its last finite
    law; the others go on, and ``diverged_at`` says which stopped at which iteration.
    """
    check_inputs(x, init, indices)
    if settings.diagonal and not init.dense:
        raise RDDRSError(
            f"a diagonal-only search restricts a dense S (RDDRS' full C); the {init.family} family is diagonal already"
        )
    noise = NoiseSource(seed, NoiseSource.OPTIMIZE, x.device, rotation, repeat=settings.repeat)
    objective = objectives.build(settings.objective, clamp, settings.cap)
    rule = steps.make(settings.step, settings.lr)
    current = init.floor(lower)
    best, best_value = current, torch.full((len(indices),), -np.inf, dtype=torch.float64, device=x.device)
    diverged_at = torch.zeros(len(indices), dtype=torch.long, device=x.device)
    trace = torch.full((len(indices), settings.iterations), np.nan, dtype=torch.float64)
    for t in tqdm(range(settings.iterations), disable=not progress, desc="search", leave=False):
        going = diverged_at == 0
        if not going.any():
            break
        eps = noise.draw(indices, settings.samples, init.dim, x.dtype, antithetic=settings.antithetic)
        value, grad = objective_and_gradient(
            model, x, current, eps, settings.kappa, settings.scale, objective, settings.control_variate
        )
        trace[:, t] = torch.where(going, value, np.nan).cpu()
        if settings.diagonal:
            grad = spd.diagonal_part(grad)
        if settings.keep_best_every and (t + 1) % settings.keep_best_every == 0:
            better = going & (value > best_value)
            best_value = torch.where(better, value, best_value)
            best = current.where(better, best)
        fails = going & ~_finite_rows(grad)
        moving = going & ~fails
        try:  # the others take a zero step: no non-finite value enters the batch's linear algebra
            moved = rule(current, torch.where(current.expand(moving), grad, torch.zeros_like(grad)), settings.max_step)
            fails |= moving & _overflowed(moved, lower)
        except torch.linalg.LinAlgError:  # a whitened step could not even be diagonalised
            moved, fails = current, going
        diverged_at[fails] = t + 1
        keep = diverged_at == 0
        if keep.any():
            floored = moved.where(keep, current).floor(lower)
            current = floored.where(keep, current)
            if settings.diagonal:  # the eigendecompositions' rounding must not grow off-diagonal entries
                current = current.with_param(spd.diagonal_part(current.param))
    if settings.keep_best_every and settings.iterations >= settings.keep_best_every:
        current = best.where(diverged_at == 0, current)  # a stopped input keeps its last finite law
    return SearchResult(current, trace.numpy(), diverged_at.cpu().numpy())


def _finite_rows(values: Tensor) -> Tensor:
    """Per input, whether all its entries are finite."""
    return torch.isfinite(values.reshape(len(values), -1)).all(1)


def _overflowed(law: Smoothing, lower) -> Tensor:
    """Per input, whether a step overflowed (too large a step size): a scale is not finite, or
    so large that after the floor the law would be numerically singular (``||S||_F``, which
    bounds the largest scale, beyond ``lower / eps``). That input's search then stops rather
    than carry NaN into a certificate."""
    size = law.param.detach().reshape(law.batch, -1).norm(dim=1)
    limit = torch.as_tensor(lower, dtype=size.dtype, device=size.device) / torch.finfo(size.dtype).eps
    return ~_finite_rows(law.param.detach()) | ~(size < limit)


def _traces(method: str, found: SearchResult) -> dict[str, np.ndarray]:
    return {method: found.trace, f"{method}_diverged_at": found.diverged_at}


def find_smoothing(
    method: str,
    model,
    x: Tensor,
    indices,
    sigma: float,
    seed: int,
    settings: dict[str, Search] | None = None,
    sigma_star: Tensor | None = None,
    start: Smoothing | None = None,
    rotation: Tensor | None = None,
    progress: bool = False,
) -> tuple[Smoothing, dict[str, np.ndarray]]:
    """The smoothing law of each input for ``method``, and the objective traces of its searches
    (key: the search's method) with the iteration at which each input's search stopped
    (``METHOD_diverged_at``, 0: it did not).

    RS uses ``sigma`` itself; DDRS searches sigma from ``sigma``; ANCER and RDDRS start from
    the DDRS optimum ``sigma_star`` (searched here unless given) with floor ``sigma_star``
    (``DDRS_FLOOR`` if their search has ``floor=False``), their laws in their own family
    (``Smoothing.embed``). RDDRS can start from ANCER's law ``start`` (diag(theta)) instead
    (C = diag(theta), same floor): it then searches a superset of ANCER's ellipsoids; a start
    that the method's family does not contain is a one-line error. ``settings`` overrides the
    papers' settings per method (keys "ddrs", "ancer", "rddrs").
    """
    record = method_record(method)
    family = family_class(record.family)
    if not sigma > 0:
        raise RDDRSError(f"sigma must be > 0, got {sigma}")
    if start is not None and (record.base is None or sigma_star is None):
        raise RDDRSError(
            f"a start law (with its sigma_x*) serves a method searched from a base's sigma_x* (as "
            f"RDDRS from ANCER), not {record.label}"
        )
    settings = {**PAPER_SEARCHES, **(settings or {})}
    d = x[0].numel()
    base = Isotropic(torch.full((len(indices),), float(sigma), dtype=x.dtype, device=x.device), d)
    if not record.searched:
        return family.embed(base), {}
    traces = {}
    first = record.base or method  # the isotropic search that gives sigma_x*
    if sigma_star is None:
        found = search(
            model, x, base, indices, settings[first], DDRS_FLOOR, seed, rotation, progress, method_record(first).clamp
        )
        sigma_star = found.smoothing.param
        traces.update(_traces(first, found))
    star = Isotropic(torch.as_tensor(sigma_star, dtype=x.dtype, device=x.device), d)
    if record.base is None:  # sigma_x* is the method's answer
        return family.embed(star), traces
    if start is not None:  # e.g. RDDRS from ANCER's diag(theta)
        init = family.embed(start.with_param(torch.as_tensor(start.param, dtype=x.dtype, device=x.device)))
    else:
        init = family.embed(star)  # searched from sigma_x* I
    lower = star.param if settings[method].floor else DDRS_FLOOR
    found = search(model, x, init, indices, settings[method], lower, seed, rotation, progress, record.clamp)
    traces.update(_traces(method, found))
    traces["sigma_star"] = star.param.detach().cpu().numpy()  # the start and floor, for --init
    return found.smoothing, traces
