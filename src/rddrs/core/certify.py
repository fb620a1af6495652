"""Cohen et al.'s PREDICT and CERTIFY for any smoothing family, batched over inputs.

For input x with smoothing law ``x + S eps``: n0 selection draws pick the top class A; n
independent estimation draws count how often the base classifier answers A; the one-sided
Clopper-Pearson bound gives ``p_A >= pA_lower`` with probability ``1 - alpha``. If
``pA_lower > 1/2`` the smoothed classifier answers A on the whole ellipsoid
``{x + delta : ||S^-1 delta||_2 < r}``, ``r = Phi^-1(pA_lower)`` (the gap); otherwise it
abstains. Two radii summarise the ellipsoid: the proxy radius ``r det(S)^(1/d)`` (ball of
equal volume) and the l2 radius ``r lambda_min(S)`` (largest ball inside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.noise import NoiseSource, Smoothing, check_inputs, noisy_outputs
from rddrs.core.stats import binomial_p_value, clopper_pearson_lower

ABSTAIN = -1


@dataclass
class Certificate:
    """Per-input results (numpy arrays of length B); radii are 0 where ``predict`` is ABSTAIN."""

    predict: np.ndarray
    p_lower: np.ndarray
    gap: np.ndarray
    radius: np.ndarray
    proxy_radius: np.ndarray


def _check_settings(alpha: float, **counts: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise RDDRSError(f"alpha must lie in (0, 1), got {alpha}")
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise RDDRSError(f"{name} must be an integer >= 1, got {value}")


@torch.no_grad()
def sample_counts(
    model, x: Tensor, smoothing: Smoothing, indices, num: int, noise: NoiseSource, batch_size: int = 10_000
) -> Tensor:
    """Class counts (B, K) of the base classifier on ``num`` noisy copies of each input.

    At most ``batch_size`` noisy copies are on the device at once. A model output that is NaN
    or infinite is a one-line error: it would count as a vote (argmax takes NaN for the largest).
    """
    check_inputs(x, smoothing, indices)
    counts = None
    nonfinite = torch.zeros((), dtype=torch.long, device=x.device)  # summed on the device: no sync per pass
    group = max(1, min(len(indices), batch_size))
    for lo in range(0, len(indices), group):
        sel = slice(lo, lo + group)
        inputs, laws = x[sel], smoothing[sel]
        per_input = max(1, batch_size // group)
        for done in range(0, num, per_input):
            m = min(per_input, num - done)
            eps = noise.draw(indices[sel], m, smoothing.dim, x.dtype)
            out = noisy_outputs(model, inputs, laws, eps)
            if counts is None:
                counts = torch.zeros(len(indices), out.shape[-1], dtype=torch.long, device=x.device)
            counts[sel] += torch.nn.functional.one_hot(out.argmax(-1), counts.shape[1]).sum(1)
            nonfinite += (~torch.isfinite(out)).sum()
    if nonfinite.item():
        raise RDDRSError(
            f"the model gave {int(nonfinite)} NaN or infinite outputs on noisy copies of inputs "
            f"{_shown(indices)}: it cannot be certified"
        )
    return counts


def _shown(indices) -> str:
    """The first few ``indices``, for a message."""
    indices = [int(i) for i in indices]
    return ", ".join(map(str, indices[:3])) + (f" and {len(indices) - 3} more" if len(indices) > 3 else "")


def predict(
    model, x: Tensor, smoothing: Smoothing, indices, n: int, alpha: float, seed: int, batch_size: int = 10_000
) -> np.ndarray:
    """Cohen's PREDICT: the top class, or ABSTAIN when a fair binomial test at level alpha
    cannot tell it from the runner-up."""
    _check_settings(alpha, n=n)
    noise = NoiseSource(seed, NoiseSource.ESTIMATE, x.device)
    counts = sample_counts(model, x, smoothing, indices, n, noise, batch_size).cpu().numpy()
    top2 = np.sort(counts, axis=1)[:, -2:]
    winner = counts.argmax(1)
    return np.where(binomial_p_value(top2[:, 1], top2.sum(1)) <= alpha, winner, ABSTAIN)


def certify(
    model,
    x: Tensor,
    smoothing: Smoothing,
    indices,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    batch_size: int = 10_000,
    rotation: Tensor | None = None,
) -> Certificate:
    """Cohen's CERTIFY for each input under its own smoothing law.

    ``indices`` name the inputs (their positions in the data set) and key the noise streams,
    so a certificate does not depend on how inputs are batched. Selection and estimation use
    independent streams, both independent of the optimisers'.
    """
    _check_settings(alpha, n0=n0, n=n)
    select = NoiseSource(seed, NoiseSource.SELECT, x.device, rotation)
    estimate = NoiseSource(seed, NoiseSource.ESTIMATE, x.device, rotation)
    top = sample_counts(model, x, smoothing, indices, n0, select, batch_size).argmax(1)
    counts = sample_counts(model, x, smoothing, indices, n, estimate, batch_size)
    n_a = counts.gather(1, top[:, None]).squeeze(1).cpu().numpy()
    p_lower = clopper_pearson_lower(n_a, n, alpha)
    certified = p_lower > 0.5
    gap = np.where(certified, special.ndtri(np.where(certified, p_lower, 0.5)), 0.0)
    proxy = smoothing.proxy().detach().double().cpu().numpy()
    min_scale = smoothing.min_scale().detach().double().cpu().numpy()
    return Certificate(
        predict=np.where(certified, top.cpu().numpy(), ABSTAIN),
        p_lower=p_lower,
        gap=gap,
        radius=gap * min_scale,
        proxy_radius=gap * proxy,
    )
