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

A method joins with ``register`` (its family, if new, with ``rddrs.core.noise.register``, and
its search in each preset's ``rddrs.core.presets.Preset.search``): ``NAMES`` and ``SEARCHED``
follow ``METHODS``, so the command line, the tables and the memory take it as they take these four.

This module imports nothing heavy, so the command line can read it before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rddrs import RDDRSError

#: the families of the four methods' smoothing laws S: sigma I, diag(theta), a full SPD matrix C
#: (``rddrs.core.noise.FAMILIES``, which answers every question about them)
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
    family: str  # a name in rddrs.core.noise.FAMILIES: ISOTROPIC, DIAGONAL, FULL, or a registered one
    searched: bool
    paper_step: str | None  # the step rule of the method's paper ("sgd" or "adam")
    starts: tuple[str, ...]  # methods whose result file can start its search (--init)
    base: str | None  # the search run first for sigma_x* (its start and floor), or None
    clamp: Clamp | None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rs", "RS", ISOTROPIC, False, None, (), None, None),
        Method(
            "ddrs",
            "DDRS",
            ISOTROPIC,
            True,
            "sgd",
            (),
            None,
            Clamp(0.02, 0.98, "autograd", "PLabarbarie/RDDRS code/dds.py (ddsmoothing's own: 0.001, 0.999)"),
        ),
        Method(
            "ancer",
            "ANCER",
            DIAGONAL,
            True,
            "adam",
            ("ddrs",),
            "ddrs",
            Clamp(0.001, 0.999, "autograd", "ddsmoothing L2Certificate.compute_proxy_gap"),
        ),
        Method(
            "rddrs",
            "RDDRS",
            FULL,
            True,
            "sgd",
            ("ddrs", "ancer"),
            "ddrs",
            Clamp(0.001, 0.999, "clamped", "PLabarbarie/RDDRS code/riemannian.py inv_Phi"),
        ),
    )
}

_BUILT_IN = frozenset(METHODS)


class _Names(Sequence):
    """The names of the methods of ``METHODS`` that ``keep`` selects, in their order, read when
    used: a read-only sequence that follows ``register`` (and equals the tuple of its names)."""

    def __init__(self, keep: Callable[[Method], bool]):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(m.name for m in METHODS.values() if self._keep(m))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other) -> bool:
        return self._names() == (tuple(other) if isinstance(other, Sequence) and not isinstance(other, str) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


#: the method names in the order they are run, drawn and tabulated
NAMES: Sequence[str] = _Names(lambda m: True)
#: the methods with a per-input search
SEARCHED: Sequence[str] = _Names(lambda m: m.searched)


def register(record: Method) -> Method:
    """Add the method ``record`` after the others (a one-line error if its name is taken, or its
    base or starts are not methods); returns it."""
    if not isinstance(record, Method):
        raise RDDRSError(f"a method is a Method record, not {record!r}")
    if record.name in METHODS:
        raise RDDRSError(f"the method {record.name!r} exists already")
    if unknown := [m for m in (record.base, *record.starts) if m is not None and m not in METHODS]:
        raise RDDRSError(f"{record.name} starts from unknown method {unknown[0]!r}")
    METHODS[record.name] = record
    return record


def unregister(name: str) -> None:
    """Remove a method that ``register`` added."""
    if name in _BUILT_IN or name not in METHODS:
        raise RDDRSError(f"{name!r} is not a registered method")
    del METHODS[name]


def method(name: str) -> Method:
    """The record of ``name``, or a one-line error naming the known methods."""
    if name not in METHODS:
        raise RDDRSError(f"unknown method {name!r}; expected one of {', '.join(NAMES)}")
    return METHODS[name]
