"""Statistical validity of certificates: is the bound ``p_lower`` wrong at most a fraction alpha of the time?

CERTIFY promises, for each input, ``P[p_lower > p_A] <= alpha`` over its own noise draws,
where ``p_A = P[f(x + S eps) = A]`` is the true probability of the class A it certifies.
``coverage`` measures that fraction by replicating inputs: each replica gets its own index,
hence its own independent noise stream, and all replicas are certified in batched calls. The
truth ``p`` comes either from a closed form (``LinearClassifier``) or from a Monte Carlo
estimate with many more draws than certification uses (``smoothed_probability``).

Check streams. ``CheckNoise`` adds two stages to ``NoiseSource``: ``attack`` (the gradient
draws of ``rddrs.studies.attack``) and ``validate`` (the draws of ``smoothed_probability``). A
stream is keyed by (seed, stage, index) and these stage numbers are never used by
certification or optimisation, so check draws are independent of theirs whatever the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from rddrs import RDDRSError
from rddrs.core.certify import ABSTAIN, certify, sample_counts
from rddrs.core.noise import NoiseSource, Smoothing
from rddrs.core.stats import clopper_pearson_lower

#: at most this many scale-matrix entries are replicated at once (full 784 x 784 laws: 27)
_REPLICATED_ENTRIES = 2**24


class CheckNoise(NoiseSource):
    """``NoiseSource`` with the stages of the checks, disjoint from those of the method."""

    ATTACK, VALIDATE = "attack", "validate"
    STAGES: ClassVar[dict[str, int]] = {**NoiseSource.STAGES, ATTACK: 3, VALIDATE: 4}


def two_sided_interval(k, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` interval on a binomial proportion."""
    k, n = np.asarray(k), np.asarray(n)
    return clopper_pearson_lower(k, n, alpha / 2), 1.0 - clopper_pearson_lower(n - k, n, alpha / 2)


@dataclass
class Estimate:
    """Monte Carlo estimate ``count / samples`` of smoothed class probabilities, with its exact
    two-sided ``1 - alpha`` interval ``[low, high]`` (arrays of one shape: (B,) or (B, K))."""

    count: np.ndarray
    samples: int
    p: np.ndarray
    low: np.ndarray
    high: np.ndarray
    alpha: float


def smoothed_probability(
    model,
    x: Tensor,
    smoothing: Smoothing,
    cls=None,
    samples: int = 100_000,
    seed: int = 0,
    batch_size: int = 10_000,
    alpha: float = 0.001,
    indices=None,
) -> Estimate:
    """Estimate ``P[f(x + S eps) = cls]`` per input (every class if ``cls`` is None).

    Draws come from the ``validate`` stage of ``seed`` (keyed by ``indices``, default
    ``0..B-1``): independent of certification and optimisation draws for any seed.
    """
    if int(samples) != samples or samples < 1:
        raise RDDRSError(f"samples must be an integer >= 1, got {samples}")
    if not 0.0 < alpha < 1.0:
        raise RDDRSError(f"alpha must lie in (0, 1), got {alpha}")
    indices = list(range(len(x))) if indices is None else indices
    noise = CheckNoise(seed, CheckNoise.VALIDATE, x.device)
    count = sample_counts(model, x, smoothing, indices, samples, noise, batch_size).cpu().numpy()
    if cls is not None:
        cls = class_indices(cls, len(x), count.shape[1])
        count = count[np.arange(len(x)), cls]
    low, high = two_sided_interval(count, samples, alpha)
    return Estimate(count=count, samples=int(samples), p=count / samples, low=low, high=high, alpha=alpha)


def class_indices(cls, batch: int, classes: int | None = None) -> np.ndarray:
    """``cls`` as a (B,) integer array of classes in ``[0, classes)``, or RDDRSError."""
    cls = np.asarray(torch.as_tensor(cls).cpu())
    if cls.shape != (batch,) or not np.issubdtype(cls.dtype, np.integer):
        raise RDDRSError(f"cls must hold one integer class per input, shape ({batch},), got {cls.dtype} {cls.shape}")
    if ((cls < 0) | (cls >= (classes or np.inf))).any():
        raise RDDRSError(f"cls must lie in [0, {classes or 'K'}), got values {cls.min()}..{cls.max()}")
    return cls


@dataclass
class Coverage:
    """How often certification was wrong: ``wrong`` of ``trials`` runs, the rate and its exact
    two-sided 95 % interval ``[low, high]``; ``certified`` runs did not abstain."""

    trials: int
    certified: int
    wrong: int
    rate: float
    low: float
    high: float


def coverage(
    model,
    x: Tensor,
    smoothing: Smoothing,
    p_true,
    trials: int,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    batch_size: int = 10_000,
) -> Coverage:
    """Run CERTIFY ``trials`` times on each input and count the wrong certificates.

    ``p_true`` (B, K) holds each input's true class probabilities under its law. A run is
    wrong when it certifies a class c with ``p_lower > p_true[c]``, or certifies a class
    that is not the true top class. A valid procedure is wrong with probability <= alpha
    per run (plus the slack of an estimated ``p_true``). Replica j of input i uses index
    ``i * trials + j``; replicas are certified in batches.
    """
    p_true = np.asarray(p_true, dtype=np.float64)
    if p_true.ndim != 2 or p_true.shape[0] != len(x):
        raise RDDRSError(f"p_true must have shape (B, K) = ({len(x)}, K), got {p_true.shape}")
    if int(trials) != trials or trials < 1:
        raise RDDRSError(f"trials must be an integer >= 1, got {trials}")
    total = len(x) * int(trials)
    owner = torch.arange(total, device=x.device) // trials
    chunk = max(1, _REPLICATED_ENTRIES // smoothing.param[0].numel())
    predicted, p_lower = [], []
    for lo in range(0, total, chunk):
        part = owner[lo : lo + chunk]
        cert = certify(model, x[part], smoothing[part], range(lo, lo + len(part)), n0, n, alpha, seed, batch_size)
        predicted.append(cert.predict)
        p_lower.append(cert.p_lower)
    predicted, p_lower, owner = np.concatenate(predicted), np.concatenate(p_lower), owner.cpu().numpy()
    certified = predicted != ABSTAIN
    if certified.any() and predicted.max() >= p_true.shape[1]:
        raise RDDRSError(f"the model predicts class {predicted.max()} but p_true has {p_true.shape[1]} classes")
    p_certified = p_true[owner, np.where(certified, predicted, 0)]
    wrong = certified & ((p_lower > p_certified) | (predicted != p_true.argmax(1)[owner]))
    low, high = two_sided_interval(wrong.sum(), total, 0.05)
    return Coverage(
        trials=total,
        certified=int(certified.sum()),
        wrong=int(wrong.sum()),
        rate=float(wrong.mean()),
        low=float(low),
        high=float(high),
    )


class LinearClassifier(nn.Module):
    """The two-class classifier with logits ``[0, w.z + b]`` (class 1 iff ``w.z + b > 0``).

    Under ``z = x + S eps``, ``w.z + b ~ N(w.x + b, ||S^T w||^2)``, so its smoothed class
    probabilities are known exactly: ``P[class 1] = Phi((w.x + b) / ||S^T w||)``.
    (All families have a symmetric S, so ``S^T w = S w``.)
    """

    def __init__(self, w: Tensor, b: float):
        super().__init__()
        if w.dim() != 1:
            raise RDDRSError(f"w must have shape (d,), got {tuple(w.shape)}")
        self.register_buffer("w", w)
        self.b = float(b)

    def score(self, z: Tensor) -> Tensor:
        """``w.z + b`` per input."""
        return z.flatten(1) @ self.w + self.b

    def forward(self, z: Tensor) -> Tensor:
        s = self.score(z)
        return torch.stack([torch.zeros_like(s), s], 1)

    def scaled_normal(self, smoothing: Smoothing, times: int = 1) -> Tensor:
        """``S^times w`` per law (B, d)."""
        v = self.w.to(smoothing.param.dtype).expand(smoothing.batch, 1, -1)
        for _ in range(times):
            v = smoothing.scale_noise(v)
        return v.squeeze(1)

    def smoothed_probabilities(self, x: Tensor, smoothing: Smoothing) -> np.ndarray:
        """Exact ``[P[class 0], P[class 1]]`` (B, 2) under each input's law."""
        t = (self.score(x) / self.scaled_normal(smoothing).norm(dim=1)).double().cpu().numpy()
        return np.stack([stats.norm.sf(t), stats.norm.cdf(t)], 1)
