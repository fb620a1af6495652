"""How much the chapters' studies compute at each preset, in one place.

A preset (``rddrs.core.presets``) sets the scale of a run: certification samples, level and the
searches. The studies built on those runs take their sizes from here, one record per chapter:

==============  ==============================================  =================================
record          what it sizes                                   read by
==============  ==============================================  =================================
``headline``    the mechanism study and its refutation attack   ``rddrs.studies.headline`` (ch. 5)
``budget``      the variant grid, tuning, frontier, gradients   ``rddrs.studies.budget`` (ch. 7)
``claims``      the rotation, kappa, floor, samples, isotropy   ``rddrs.studies.claims`` (ch. 8)
==============  ==============================================  =================================

This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from rddrs import RDDRSError


@dataclass(frozen=True)
class HeadlineBudget:
    """Chapter 5: the laws behind the headline and the attack on their certificates."""

    mechanism_count: int  # images of the mechanism study (0..count-1)
    mechanism_votes: int  # draws per point of its smoothed classifiers' votes
    refutation_steps: int  # PGD steps and draws per step of its refutation attack
    refutation_samples: int
    refutation_images: int  # first images of Figure 2's other panels whose certificates are attacked
    pool_per_class: int  # their laws' classifier is measured at this many images of each class


@dataclass(frozen=True)
class GridBudget:
    """Chapter 7: the grid of search variants and what is measured around it."""

    count: int  # reported images 0..count-1 (also Figure 2's below the paper preset)
    tuning: tuple[int, int]  # (first, count) of the validation images
    frontier: dict  # method -> ((iterations, samples), ...)
    best_count: int  # images of the best_sigmaS studies
    gradient_images: int
    gradient_sizes: tuple[int, ...]
    gradient_reference: int
    gradient_repeats: int


@dataclass(frozen=True)
class ClaimsBudget:
    """Chapter 8: the studies of the paper's other claims."""

    count: int  # images of the rotation, kappa, floor and isotropy studies
    kappas: tuple[float, ...]
    sample_inputs: int  # images of the samples study
    sample_sizes: tuple[int, ...]  # gradient samples per iteration (even: antithetic pairs)
    repeats: int  # independent searches per size and draw scheme


@dataclass(frozen=True)
class Budget:
    """Every chapter's study sizes at one preset."""

    headline: HeadlineBudget
    budget: GridBudget
    claims: ClaimsBudget


# cpu: the claims studies take about 35 min of one busy core (RDDRS ~20 s per image there).
BUDGETS = {
    "smoke": Budget(
        HeadlineBudget(
            mechanism_count=2,
            mechanism_votes=64,
            refutation_steps=3,
            refutation_samples=16,
            refutation_images=2,
            pool_per_class=1,
        ),
        GridBudget(
            count=2,
            tuning=(2, 2),
            best_count=2,
            frontier={"ddrs": ((5, 8), (10, 16)), "ancer": ((3, 8), (5, 16)), "rddrs": ((3, 16), (5, 32))},
            gradient_images=1,
            gradient_sizes=(16, 64),
            gradient_reference=1024,
            gradient_repeats=2,
        ),
        ClaimsBudget(count=2, kappas=(0.0, 1e-6, 1.0), sample_inputs=1, sample_sizes=(8, 32), repeats=2),
    ),
    "cpu": Budget(
        HeadlineBudget(
            mechanism_count=4,
            mechanism_votes=500,
            refutation_steps=10,
            refutation_samples=64,
            refutation_images=4,
            pool_per_class=3,
        ),
        GridBudget(
            count=20,
            tuning=(20, 8),
            best_count=30,
            frontier={
                "ddrs": ((75, 32), (150, 64), (300, 128)),
                "ancer": ((25, 32), (50, 64), (100, 128), (200, 256)),
                "rddrs": ((15, 250), (30, 500), (60, 1000)),
            },
            gradient_images=4,
            gradient_sizes=(250, 1000, 4000, 20_000),
            gradient_reference=200_000,
            gradient_repeats=8,
        ),
        ClaimsBudget(
            count=8, kappas=(0.0, 1e-6, 1e-2, 1.0, 10.0), sample_inputs=2, sample_sizes=(250, 1000, 4000), repeats=3
        ),
    ),
    "paper": Budget(
        HeadlineBudget(
            mechanism_count=20,
            mechanism_votes=2000,
            refutation_steps=20,
            refutation_samples=128,
            refutation_images=10,
            pool_per_class=10,
        ),
        GridBudget(
            count=10,
            tuning=(10, 4),
            best_count=10,
            frontier={},
            gradient_images=4,
            gradient_sizes=(1000, 4000, 20_000),
            gradient_reference=200_000,
            gradient_repeats=8,
        ),
        ClaimsBudget(
            count=100,
            kappas=(0.0, 1e-6, 1e-2, 1.0, 10.0),
            sample_inputs=3,
            sample_sizes=(1000, 5000, 20_000),
            repeats=5,
        ),
    ),
}


def of(preset: str) -> Budget:
    """The study sizes of ``preset``, or a one-line error naming the known presets."""
    if preset not in BUDGETS:
        raise RDDRSError(f"unknown preset {preset!r}; expected one of {', '.join(BUDGETS)}")
    return BUDGETS[preset]
