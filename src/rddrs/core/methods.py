"""The four certification methods as data: one record per method, read by every module that
needs to know something about a method (search, runs, studies, memory, tables and figures; how
figures draw each method is :mod:`rddrs.studies.display`'s).

==========  ===========  =============================  ===========  ====================
method      family of S  search                         paper step   starts from
==========  ===========  =============================  ===========  ====================
RS          isotropic    none (sigma as given)          --           --
DDRS        isotropic    gradient ascent on sigma       sgd          sigma
ANCER       diagonal     ascent on theta                adam         DDRS' sigma_x*
RDDRS       full SPD     Riemannian ascent on C         sgd          DDRS' sigma_x*, or
                                                                     ANCER's diag(theta)
==========  ===========  =============================  ===========  ====================

``base`` is the search whose optimum sigma_x* starts (and floors) the method's own; it runs
first, or is read from a finished run of it (``--init``). ``starts`` lists the methods whose
result files can give that start.

``clamp`` records how the authors' public code clamps the smoothed probabilities G_A, G_B
before ``Phi^-1`` (the ``clamped`` objective of ``rddrs.core.objectives``): the interval, and
whether the gradient is autograd's through the clamp (zero outside the interval) or the
derivative of ``Phi^-1`` evaluated at the clamped value (RDDRS' hand-written gradient).

This module imports nothing heavy, so the command line can read it before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from rddrs import RDDRSError

#: the families of smoothing laws S: sigma I, diag(theta), a full SPD matrix C
ISOTROPIC, DIAGONAL, FULL = "isotropic", "diagonal", "full"


@dataclass(frozen=True)
class Clamp:
    """``G -> min(max(G, low), high)`` before ``Phi^-1``; ``slope``: "autograd" (zero gradient
    where clamped) or "clamped" (``1 / phi(Phi^-1(clamped G))`` times the gradient of G)."""

    low: float
    high: float
    slope: str
    source: str  # where the authors' code does it


@dataclass(frozen=True)
class Method:
    """What the library knows about one method."""

    name: str
    label: str
    family: str               # ISOTROPIC, DIAGONAL or FULL
    searched: bool
    paper_step: str | None    # the step rule of the method's paper ("sgd" or "adam")
    starts: tuple[str, ...]   # methods whose result file can start its search (--init)
    base: str | None          # the search run first for sigma_x* (its start and floor), or None
    clamp: Clamp | None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rs", "RS", ISOTROPIC, False, None, (), None, None),
    Method("ddrs", "DDRS", ISOTROPIC, True, "sgd", (), None,
           Clamp(0.02, 0.98, "autograd", "PLabarbarie/RDDRS code/dds.py (ddsmoothing's own: 0.001, 0.999)")),
    Method("ancer", "ANCER", DIAGONAL, True, "adam", ("ddrs",), "ddrs",
           Clamp(0.001, 0.999, "autograd", "ddsmoothing L2Certificate.compute_proxy_gap")),
    Method("rddrs", "RDDRS", FULL, True, "sgd", ("ddrs", "ancer"), "ddrs",
           Clamp(0.001, 0.999, "clamped", "PLabarbarie/RDDRS code/riemannian.py inv_Phi")),
)}

#: axes of each family's parameter per input: sigma (), theta (d,), C (d, d)
PARAM_AXES: dict[str, int] = {ISOTROPIC: 0, DIAGONAL: 1, FULL: 2}

#: the method names in the order they are run, drawn and tabulated
NAMES: tuple[str, ...] = tuple(METHODS)
#: the methods with a per-input search
SEARCHED: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.searched)


def method(name: str) -> Method:
    """The record of ``name``, or a one-line error naming the known methods."""
    if name not in METHODS:
        raise RDDRSError(f"unknown method {name!r}; expected one of {', '.join(NAMES)}")
    return METHODS[name]
