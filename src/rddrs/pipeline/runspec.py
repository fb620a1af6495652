"""Runs as data: what one result file needs, and the order in which runs depend on each other.

A ``RunSpec`` describes one output file completely: a certification (``kind="certify"``: the
arguments of ``settings.make_settings``, the test images it must hold, the result file its
search starts from) or a memory pass over one (``kind="memory"``). A spec is idempotent:
computing it again computes only what its file lacks. The chapters and ``rddrs sweep`` read
the same specs (``rddrs.studies.registry``), so they cannot disagree about what a preset needs.
``combine`` joins the specs of one file, ``with_dependencies`` orders runs after the runs they
start from, ``closure`` adds those; ``standard_specs`` and ``memory_spec`` are the paper's runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.methods import NAMES, method as method_record
from rddrs.pipeline.results import memory_path, model_path, result_path
from rddrs.pipeline.settings import RunRequest, RunSettings, request_fields, resolve

CERTIFY, MEMORY = "certify", "memory"


@dataclass(frozen=True)
class RunSpec(RunRequest):
    """One output file and everything that determines it: a ``RunRequest`` (for a certification)
    and where its rows go.

    ``ranges``: the test images ``[lo, hi)`` of ``dataset`` the file must hold (a certification);
    ``init``: the result file its search starts from (``--init``); ``source``: the certification a
    memory pass reads; ``groups``: which parts of the book read the file; ``priority``: shards of runs
    with a smaller one start first (``execute``). Paths are kept as given (absolute ones travel to
    other machines of a cluster).
    """

    out: str
    kind: str = CERTIFY
    ranges: tuple[tuple[int, int], ...] = ()
    source: str | None = None
    groups: tuple[str, ...] = ()
    priority: int = 0
    data: str = "data"
    inputs_per_batch: int | None = None
    batch_size: int = 2000

    @classmethod
    def of(cls, request: RunRequest, out: str | Path, **where) -> "RunSpec":
        """The run ``request`` asks for, into the file ``out`` (``where``: the other fields, e.g. ``ranges``)."""
        return cls(str(out), **request_fields(request), **where)

    def __post_init__(self):
        if self.kind not in (CERTIFY, MEMORY):
            raise RDDRSError(f"unknown kind of run {self.kind!r}")
        if self.kind == MEMORY and self.source is None:
            raise RDDRSError(f"the memory pass {self.out} needs the result file it reads (source)")
        object.__setattr__(self, "ranges", _normal_ranges(self.ranges))

    @property
    def depends(self) -> str | None:
        """The file this run reads from another run: its start (init) or its source."""
        return self.init if self.kind == CERTIFY else self.source

    def indices(self) -> list[int]:
        """The test images the file must hold, ascending."""
        return [i for lo, hi in self.ranges for i in range(lo, hi)]

    def settings(self) -> RunSettings:
        """The ``RunSettings`` of a certification (hashing the model file)."""
        if self.kind != CERTIFY:
            raise RDDRSError(f"{self.out} is a memory pass, not a certification")
        return resolve(self.request())

    def describe(self) -> str:
        """One line: the run and its file."""
        if self.kind == MEMORY:
            return f"memory pass over {Path(self.source).name}"
        what = f"{method_record(self.method).label} sigma={self.sigma:g}"
        extra = ", ".join(
            [f"{k}={v}" for k, v in sorted(self.search.items())]
            + ([f"rotate={self.rotate}"] if self.rotate is not None else [])
            + ([f"dataset={self.dataset}"] if self.dataset != "mnist" else [])
        )
        return f"{what}{f' ({extra})' if extra else ''}, images {_ranges_text(self.ranges)}"


def _normal_ranges(ranges) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent ``[lo, hi)`` ranges covering the same indices."""
    out: list[list[int]] = []
    for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges):
        if lo < 0 or hi <= lo:
            raise RDDRSError(f"a range of test images must be 0 <= lo < hi, got [{lo}, {hi})")
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _ranges_text(ranges) -> str:
    return ", ".join(f"{lo}..{hi - 1}" for lo, hi in ranges) or "none"


#: the fields whose equality makes two specs the same run (the others are merged): the request's and
#: what the file is
_RUN_FIELDS = ("kind", "source", *(f.name for f in fields(RunRequest)))


def combine(specs: Iterable[RunSpec]) -> list[RunSpec]:
    """One spec per output file, in first-seen order: specs of the same file must be the same
    run; their image ranges and groups are joined, and the smaller priority is kept."""
    by_out: dict[str, RunSpec] = {}
    for spec in specs:
        key = str(Path(spec.out))
        if key not in by_out:
            by_out[key] = spec
            continue
        old = by_out[key]
        if differ := [f for f in _RUN_FIELDS if getattr(old, f) != getattr(spec, f)]:
            raise RDDRSError(f"two different runs want the file {spec.out} ({', '.join(differ)} differ)")
        by_out[key] = replace(
            old,
            ranges=old.ranges + spec.ranges,
            priority=min(old.priority, spec.priority),
            groups=old.groups + tuple(g for g in spec.groups if g not in old.groups),
        )
    return list(by_out.values())


def with_dependencies(specs: list[RunSpec]) -> list[RunSpec]:
    """``specs`` in an order where every run comes after the run it depends on, with the images
    a run starts from added to that run (a start must hold every image of its dependants)."""
    specs = combine(specs)
    by_out = {str(Path(s.out)): s for s in specs}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(key: str, chain: tuple[str, ...]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise RDDRSError(f"runs depend on each other in a circle: {' -> '.join(chain + (key,))}")
        state[key] = "visiting"
        dep = by_out[key].depends
        if dep is not None and str(Path(dep)) in by_out:
            visit(str(Path(dep)), chain + (key,))
        state[key] = "done"
        order.append(key)

    for key in by_out:
        visit(key, ())
    # images flow from dependants to their starts: visit dependants first
    for key in reversed(order):
        spec = by_out[key]
        if spec.kind == CERTIFY and spec.init is not None and str(Path(spec.init)) in by_out:
            start = by_out[str(Path(spec.init))]
            by_out[str(Path(spec.init))] = replace(start, ranges=start.ranges + spec.ranges)
    return [by_out[key] for key in order]


def closure(wanted: Iterable[RunSpec], pool: Iterable[RunSpec]) -> list[RunSpec]:
    """``wanted`` and, from ``pool``, every run they depend on, directly or not."""
    by_out = {str(Path(s.out)): s for s in pool}
    chosen = list(wanted)
    seen = {str(Path(s.out)) for s in chosen}
    queue = list(chosen)
    while queue:
        dep = queue.pop().depends
        if dep is not None and str(Path(dep)) in by_out and str(Path(dep)) not in seen:
            seen.add(str(Path(dep)))
            chosen.append(by_out[str(Path(dep))])
            queue.append(by_out[str(Path(dep))])
    return chosen


def standard_specs(
    sigma: float,
    preset: str,
    results: str | Path,
    *,
    methods: Iterable[str] = NAMES,
    count: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    data: str | Path = "data",
    models: str | Path = "data/models",
    groups: tuple[str, ...] = ("standard",),
    dataset: str = "mnist",
) -> list[RunSpec]:
    """The paper's runs at one sigma (``RESULTS/METHOD_sigmaS.tsv``) on test images
    ``0..count-1`` (count: the preset's) of ``dataset``, with its model at sigma (``model_path``):
    RS, DDRS, and ANCER and RDDRS started from DDRS' sigma_x* (its result file). The base run a
    method needs is added when ``methods`` omits it. ``results``: the folder of the dataset's runs
    (``results.dataset_folder``)."""
    from rddrs.core.presets import preset as preset_record

    count = preset_record(preset).count if count is None else int(count)
    if count < 1:
        raise RDDRSError(f"count must be >= 1, got {count}")
    model = model_path(sigma, models, dataset)
    wanted = list(methods)
    for name in list(wanted):
        base = method_record(name).base
        if base is not None and base not in wanted:
            wanted.insert(0, base)
    specs = []
    for name in NAMES:
        if name not in wanted:
            continue
        base = method_record(name).base
        specs.append(
            RunSpec(
                str(result_path(results, name, sigma)),
                method=name,
                sigma=float(sigma),
                preset=preset,
                model=str(model),
                ranges=((0, count),),
                seed=seed,
                device=device,
                init=None if base is None else str(result_path(results, base, sigma)),
                groups=groups,
                data=str(data),
                dataset=dataset,
            )
        )
    return specs


def memory_spec(source: RunSpec, groups: tuple[str, ...] = ("memory",)) -> RunSpec:
    """The memory pass over the certification ``source`` (``OUT.memory.tsv``)."""
    from_out = Path(source.out)
    return RunSpec(
        str(memory_path(from_out)),
        kind=MEMORY,
        source=source.out,
        device="cpu",
        groups=groups,
        data=source.data,
        dataset=source.dataset,
    )
