"""Runs as data: what one result file needs, how it is split into shards, and the driver that
computes whatever is missing, in the order the runs depend on each other.

A ``RunSpec`` describes one output file completely: a certification (``kind="certify"``: the
arguments of ``settings.make_settings``, the test images it must hold, the result file its
search starts from) or a memory pass over one (``kind="memory"``). A spec is idempotent:
computing it again computes only what its file lacks. The chapters and ``rddrs sweep`` read
the same specs (``rddrs.studies.registry``), so they cannot disagree about what a preset needs.

Shards. The missing test images of a certification are cut into shards at multiples of the
shard size (rounded to a multiple of the run's inputs per batch, so that a shard batches its
images as one uninterrupted run does and its rows are the same, bit for bit; the noise streams
are keyed by test index). A shard is the same run over a sub-range, written to
``OUT.shards/LO-HI.tsv`` (with its sidecar and traces) by ``rddrs.pipeline.runs.run_certification``,
so it resumes from its flushed rows when it is run again, for instance after its worker was
killed. When a shard is complete, the driver merges it into ``OUT`` (under OUT's lock, with the
checks of ``rddrs merge``: the same settings, no row twice) and removes it. A shard file left by
an interrupted sweep is picked up by the next one, and a shard whose rows are all in ``OUT``
already is never run.

Order. A certification whose search starts from another run (``init``) waits for the rows it
starts from, shard by shard; a memory pass waits for its whole certification. An image whose
search diverges is a row like any other (``search`` says ``diverged@ITER``); an error fails its
run (and blocks its dependants) while the rest goes on.

Engines (``Inline``: this process, one shard after another; ``Local``: a pool of processes on
this machine, processes x threads <= cores; ``rddrs.pipeline.cluster.RayEngine``: Ray tasks) only run
``run_task``: the driver plans, merges and reports, so a shard's output is the same whichever
engine ran it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.methods import NAMES, method as method_record
from rddrs.pipeline.files import Busy, ensure_dir, exclusive
from rddrs.pipeline.provenance import row_writers
from rddrs.pipeline.results import (memory_path, model_path, read_rows, read_sidecar, result_path, sidecar_path,
                                    traces_dir)

CERTIFY, MEMORY = "certify", "memory"


@dataclass(frozen=True)
class RunSpec:
    """One output file and everything that determines it.

    ``ranges``: the test images ``[lo, hi)`` of ``dataset`` the file must hold (a certification); ``init``:
    the result file its search starts from (``--init``); ``source``: the certification a memory
    pass reads; ``groups``: which parts of the book read the file; ``priority``: shards of runs
    with a smaller one start first (``execute``). Paths are kept as given (absolute ones travel to
    other machines of a cluster).
    """

    out: str
    kind: str = CERTIFY
    method: str | None = None
    sigma: float | None = None
    preset: str | None = None
    model: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    seed: int = 0
    device: str = "cpu"
    rotate: int | None = None
    search: dict = field(default_factory=dict)
    init: str | None = None
    source: str | None = None
    n0: int | None = None
    n: int | None = None
    alpha: float | None = None
    probabilities: bool = False
    groups: tuple[str, ...] = ()
    priority: int = 0
    data: str = "data"
    inputs_per_batch: int | None = None
    batch_size: int = 2000
    dataset: str = "mnist"

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

    def settings(self):
        """``settings.RunSettings`` of a certification (hashing the model file)."""
        from rddrs.pipeline.settings import make_settings

        if self.kind != CERTIFY:
            raise RDDRSError(f"{self.out} is a memory pass, not a certification")
        return make_settings(self.method, self.sigma, self.model, self.preset, seed=self.seed, device=self.device,
                             rotate=self.rotate, init=self.init, probabilities=self.probabilities, n0=self.n0,
                             n=self.n, alpha=self.alpha, search=dict(self.search) or None, dataset=self.dataset)

    def describe(self) -> str:
        """One line: the run and its file."""
        if self.kind == MEMORY:
            return f"memory pass over {Path(self.source).name}"
        what = f"{method_record(self.method).label} sigma={self.sigma:g}"
        extra = ", ".join([f"{k}={v}" for k, v in sorted(self.search.items())]
                          + ([f"rotate={self.rotate}"] if self.rotate is not None else [])
                          + ([f"dataset={self.dataset}"] if self.dataset != "mnist" else []))
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


#: the fields whose equality makes two specs the same run (the others are merged)
_RUN_FIELDS = ("kind", "method", "sigma", "preset", "model", "seed", "device", "rotate", "search", "init",
               "source", "n0", "n", "alpha", "probabilities", "dataset")


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
        by_out[key] = replace(old, ranges=old.ranges + spec.ranges, priority=min(old.priority, spec.priority),
                              groups=old.groups + tuple(g for g in spec.groups if g not in old.groups))
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


def standard_specs(sigma: float, preset: str, results: str | Path, *, methods: Iterable[str] = NAMES,
                   count: int | None = None, seed: int = 0, device: str = "cpu", data: str | Path = "data",
                   models: str | Path = "data/models", groups: tuple[str, ...] = ("standard",),
                   dataset: str = "mnist") -> list[RunSpec]:
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
        specs.append(RunSpec(str(result_path(results, name, sigma)), method=name, sigma=float(sigma), preset=preset,
                             model=str(model), ranges=((0, count),), seed=seed, device=device,
                             init=None if base is None else str(result_path(results, base, sigma)),
                             groups=groups, data=str(data), dataset=dataset))
    return specs


def standard_runs(sigma: float, preset: str, results: str | Path, *, device: str = "cpu",
                  count: int | None = None, seed: int = 0, data: str | Path = "data",
                  models: str | Path = "data/models", progress: bool = True) -> dict[str, Path]:
    """The four methods at one sigma, as in the paper (``standard_specs``), computed in this
    process where missing; returns the result files by method."""
    specs = standard_specs(sigma, preset, results, count=count, seed=seed, device=device, data=data, models=models)
    execute(specs, results=results, progress=progress).check()
    return {spec.method: Path(spec.out) for spec in specs}


def memory_spec(source: RunSpec, groups: tuple[str, ...] = ("memory",)) -> RunSpec:
    """The memory pass over the certification ``source`` (``OUT.memory.tsv``)."""
    from_out = Path(source.out)
    return RunSpec(str(memory_path(from_out)), kind=MEMORY, source=source.out,
                   device="cpu", groups=groups, data=source.data, dataset=source.dataset)


def shards_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


_SHARD = re.compile(r"^(\d+)-(\d+)\.tsv$")


@dataclass(frozen=True)
class Task:
    """What an engine runs: one shard of a certification (``lo .. hi-1`` into ``path``), or a
    whole memory pass."""

    spec: RunSpec
    lo: int = 0
    hi: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.spec.out, self.lo, self.hi)

    @property
    def path(self) -> Path:
        if self.spec.kind == MEMORY:
            return Path(self.spec.out)
        return shards_dir(self.spec.out) / f"{self.lo}-{self.hi}.tsv"

    def describe(self) -> str:
        if self.spec.kind == MEMORY:
            return self.spec.describe()
        return f"{self.spec.describe().rsplit(', images', 1)[0]}, images {self.lo}..{self.hi - 1}"


def missing(spec: RunSpec) -> list[int]:
    """The test images a certification still lacks in its file, or for a memory pass the rows of
    its source that the pass has not written (the pass needs a source with rows: ``[-1]`` until
    then)."""
    if spec.kind == MEMORY:
        from rddrs.pipeline.memory import read_memory_rows

        source = read_rows(spec.source)
        done = {row["idx"] for row in read_memory_rows(Path(spec.out))}
        return [i for i in sorted(source) if i not in done] if source else [-1]
    done = read_rows(spec.out)
    return [i for i in spec.indices() if i not in done]


def complete(specs: Iterable[RunSpec]) -> bool:
    """Whether every run's file is there in full."""
    return all(not missing(s) for s in specs)


def _batch(spec: RunSpec) -> int:
    """The run's inputs per batch (a shard is a whole number of them)."""
    from rddrs.pipeline.settings import default_inputs_per_batch

    return spec.inputs_per_batch or default_inputs_per_batch(spec.settings())


def _shard_size(spec: RunSpec, size: int | None) -> int:
    """``size`` rounded down to a multiple of the run's inputs per batch (at least one batch)."""
    if size is None:
        return 1 << 62
    batch = _batch(spec)
    return max(batch, size // batch * batch)


def plan(spec: RunSpec, shard_size: int | None = None, *, check: bool = True) -> list[Task]:
    """The tasks that complete ``spec``: none if it is complete; one memory pass; or shards of
    the missing images, reusing the shard files of an earlier sweep that fit. ``check``: refuse
    a file written with other settings."""
    if spec.kind == MEMORY:
        return [Task(spec)] if missing(spec) else []
    out = Path(spec.out)
    if check and out.exists() and out.stat().st_size > 0:
        from rddrs.pipeline.settings import check_settings

        check_settings(out, spec.settings())
    todo = missing(spec)
    if not todo:
        _remove_stale_shards(spec)
        return []
    todo_set = set(todo)
    tasks, covered = [], set()
    for lo, hi in _existing_shards(spec):  # resume an interrupted sweep's shards where they fit
        block = set(range(lo, hi))
        if block <= todo_set and not block & covered:
            tasks.append(Task(spec, lo, hi))
            covered |= block
    size = _shard_size(spec, shard_size)
    runs: list[list[int]] = []
    for i in todo:
        if i in covered:
            continue
        if runs and runs[-1][1] == i and runs[-1][0] // size == i // size:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    tasks += [Task(spec, lo, hi) for lo, hi in runs]
    return sorted(tasks, key=lambda t: t.lo)


def _existing_shards(spec: RunSpec) -> list[tuple[int, int]]:
    folder = shards_dir(spec.out)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), int(m[2])) for m in (_SHARD.match(p.name) for p in folder.iterdir()) if m]
    return sorted((lo, hi) for lo, hi in found if hi > lo)


def _remove_shard(path: Path) -> None:
    for p in (path, sidecar_path(path), path.with_name(path.name + ".lock")):
        p.unlink(missing_ok=True)
    shutil.rmtree(traces_dir(path), ignore_errors=True)
    try:
        path.parent.rmdir()  # the shards folder, once empty
    except OSError:
        pass


def _remove_stale_shards(spec: RunSpec) -> None:
    """Remove the shard files all of whose rows are in the run's file (merged already)."""
    done = read_rows(spec.out)
    for lo, hi in _existing_shards(spec):
        path = shards_dir(spec.out) / f"{lo}-{hi}.tsv"
        if all(i in done for i in range(lo, hi)):
            _remove_shard(path)


def merge_shard(task: Task, partial: bool = False) -> int:
    """Join a complete shard into its run's file (under the file's lock, with the checks of
    ``rddrs.pipeline.runs.add_rows``) and remove it; returns the rows added. ``partial``: a shard that
    was stopped, whose rows (whole batches) are joined all the same."""
    from rddrs.pipeline.runs import add_rows

    out, shard = Path(task.spec.out), task.path
    with exclusive(out):
        part = read_rows(shard)
        if not partial and (lacking := [i for i in range(task.lo, task.hi) if i not in part]):
            raise RDDRSError(f"{shard} lacks idx {lacking[0]} ({len(lacking)} rows): the shard is not complete")
        added = add_rows(out, part, read_sidecar(shard), traces_dir(shard), str(shard)) if part else 0
        _remove_shard(shard)
    return added


# -- what an engine runs -------------------------------------------------------------------

@lru_cache(maxsize=4)
def _model(path: str, device: str, probabilities: bool):
    from rddrs.pipeline.models import load_model, resolve_device

    return load_model(path, device=resolve_device(device), probabilities=probabilities)


@lru_cache(maxsize=2)
def _test_set(data: str, dataset: str):
    from rddrs.pipeline.data import load_dataset

    return load_dataset(Path(data), dataset, train=False)


def run_task(task: Task, threads: int | None = None) -> dict:
    """Compute one task where it is called (a worker of any engine) and say how it went:
    ``{"status": "done" | "error", "message": ..., "retry": ..., "pid": ...}``; ``retry``: whether
    the same task can succeed later (its file was being written by another process)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = task.spec
    try:
        if spec.kind == MEMORY:
            from rddrs.pipeline.memory import apply_memory

            images, labels = _test_set(spec.data, spec.dataset)
            apply_memory(Path(spec.source), images, 0, progress=False, labels=labels)
        else:
            from rddrs.pipeline.runs import run_certification

            settings = spec.settings()
            images, labels = _test_set(spec.data, spec.dataset)
            if task.hi > len(images):
                raise RDDRSError(f"test images {task.lo}..{task.hi - 1} reach outside the test set "
                                 f"(0..{len(images) - 1})")
            model = _model(settings.model, settings.device, settings.probabilities)
            run_certification(settings, model, images[task.lo: task.hi], labels[task.lo: task.hi], task.lo,
                              task.path, spec.inputs_per_batch, spec.batch_size, progress=False,
                              test_labels=labels)
    except RDDRSError as err:
        return {"status": "error", "message": str(err), "retry": isinstance(err, Busy), "pid": os.getpid()}
    return {"status": "done", "pid": os.getpid()}


class Inline:
    """Tasks in this process, one after another (the chapters' engine)."""

    name = "inline"
    capacity = 1

    def __init__(self, threads: int | None = None):
        self.threads, self._queue = threads, []

    def submit(self, task: Task) -> None:
        self._queue.append(task)

    def wait(self, timeout: float) -> list[tuple[Task, dict]]:
        if not self._queue:
            return []
        task = self._queue.pop(0)
        return [(task, run_task(task, self.threads))]

    def close(self, cancel: bool = False) -> None:
        self._queue.clear()


@dataclass
class Report:
    """What a sweep did: runs complete before, shards computed, shards left for a later sweep
    (its time was up), runs failed (and of those, the ones that the same sweep run again can
    complete: a worker died, a file was being written by another process)."""

    runs: int = 0
    complete_before: int = 0
    shards: int = 0
    done: int = 0
    left: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    retry: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def check(self) -> "Report":
        """This report, or a one-line error naming the first run that failed and why."""
        if self.failed:
            out, message = next(iter(self.failed.items()))
            raise RDDRSError(f"{Path(out).name}: {message}")
        return self

    def summary(self) -> str:
        text = (f"{self.runs} runs: {self.complete_before} complete before, {self.done} of {self.shards} "
                f"shards computed in {self.seconds:.1f} s")
        if self.left:
            text += f", {self.left} left for the next sweep (time was up)"
        if self.failed:
            text += f", {len(self.failed)} failed"
        return text


class _Progress:
    """A bar over shards: done, running, failed and left, with tqdm's estimate of the time left."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="shard", desc="sweep", disable=not enabled or total == 0,
                        dynamic_ncols=True)
        self.counts: dict = {}

    def update(self, done: int = 0, running: int = 0, failed: int = 0, left: int = 0) -> None:
        counts = {"done": done, "running": running, "failed": failed, "left": left}
        if counts != self.counts:
            self.counts = counts
            self.bar.n = done + failed
            self.bar.set_postfix(counts)

    def close(self) -> None:
        self.bar.close()


def sweep_lock(results: str | Path):
    """The lock of one results directory: one sweep (or chapter computing runs) at a time."""
    from contextlib import ExitStack, contextmanager

    @contextmanager
    def held():
        with ExitStack() as stack:
            try:
                stack.enter_context(exclusive(Path(results) / ".sweep"))
            except Busy:
                raise Busy(f"another sweep is computing runs in {results}; wait for it to end "
                           f"(the runs it leaves missing can then be computed)") from None
            yield

    return held()


def execute(specs: Iterable[RunSpec], engine=None, *, shard_size: int | None = None, results: str | Path | None = None,
            progress: bool = False, poll: float = 0.5, until: float | None = None) -> Report:
    """Compute every run of ``specs`` that is missing or incomplete (``engine``: ``Inline()``
    unless given), merging shards as they complete. ``results``: the directory whose sweep lock
    is held meanwhile (one sweep at a time). Returns the report; runs that failed are in
    ``report.failed`` (nothing is raised for them).

    Shards start in the order of ``(spec.priority, first image, depth in the chain of starts)``,
    each once the rows it starts from are there: the most urgent runs advance together, chunk
    by chunk. With ``until`` (seconds from now) no shard starts that would not end in time (it
    is shortened to the whole batches that fit, at the pace measured so far or in its file's
    ``seconds``); at the deadline the shards still running are stopped and their finished
    batches merged, and what is left is reported, for the same call to continue later."""
    engine = engine or Inline()
    specs = with_dependencies(list(specs))
    if until is not None and not until > 0:
        raise RDDRSError(f"the time limit must be > 0 seconds, got {until}")
    deadline = None if until is None else time.monotonic() + until
    if results is None:
        return _Sweep(specs, engine, shard_size, deadline).run(progress, poll)
    ensure_dir(Path(results))
    with sweep_lock(results):
        return _Sweep(specs, engine, shard_size, deadline).run(progress, poll)


def _key(path) -> str:
    return str(Path(path))


PENDING, DONE, FAILED = "pending", "done", "failed"


class _Sweep:
    """One sweep's state: each run's state, the tasks waiting (in start order), running and left
    for later, the rows of the files that others start from, and the pace of each run."""

    def __init__(self, specs: list[RunSpec], engine, shard_size: int | None, deadline: float | None):
        self.by_out = {_key(s.out): s for s in specs}
        self.engine, self.deadline = engine, deadline
        self.report = Report(runs=len(specs))
        self.state: dict[str, str] = {}
        self.queue: list[Task] = []
        self.running: dict[tuple, tuple[Task, float]] = {}  # task key -> (task, start time)
        self.left: list[Task] = []
        self.failed_shards = 0
        self._rows: dict[str, set[int]] = {}
        self.pace: dict[str, float] = {}  # seconds per image, measured in this sweep
        depth: dict[str, int] = {}
        for spec in specs:  # in dependency order
            key, dep = _key(spec.out), spec.depends
            depth[key] = depth.get(_key(dep), -1) + 1 if dep is not None else 0
            try:
                tasks = plan(spec, shard_size)
            except RDDRSError as err:
                self.fail(key, str(err), isinstance(err, Busy))
                continue
            if spec.kind == MEMORY and not tasks and self.state.get(_key(spec.source)) == PENDING:
                tasks = [Task(spec)]  # its certification grows: the pass continues after it
            self.state[key] = PENDING if tasks else DONE
            self.queue += tasks
            self.report.shards += len(tasks)
            self.report.complete_before += not tasks
        self.queue.sort(key=lambda t: (t.spec.priority, t.lo, depth[_key(t.spec.out)]))

    # -- what can start ------------------------------------------------------------------------
    def rows_of(self, out: str) -> set[int]:
        if out not in self._rows:
            self._rows[out] = set(read_rows(out))
        return self._rows[out]

    def blocked(self, task: Task) -> str | None:
        """Why ``task`` cannot start now: "wait" for rows to come, a message if they never will,
        None if it can."""
        dep = task.spec.depends
        if dep is None:
            return None
        key = _key(dep)
        if self.state.get(key) == FAILED:
            return f"the run it reads, {Path(key).name}, failed: {self.report.failed[key]}"
        if task.spec.kind == MEMORY or (key in self.by_out and self.state[key] == DONE):
            return None if self.state.get(key, DONE) == DONE else "wait"
        return None if all(i in self.rows_of(key) for i in range(task.lo, task.hi)) else "wait"

    def seconds_per_image(self, spec: RunSpec) -> float | None:
        """The run's pace: measured in this sweep, else the mean ``seconds`` of the rows its file
        got from sessions on this kind of device (a GPU's rows say little about a CPU's pace)."""
        key = _key(spec.out)
        if key not in self.pace and spec.kind == CERTIFY:
            rows = read_rows(spec.out)
            if rows:
                kind = spec.device.split(":")[0]
                writers = row_writers(read_sidecar(spec.out), rows)
                seconds = [r["seconds"] for i, r in rows.items() if str(writers.get(i, {}).get("device", "")).startswith(kind)]
                if seconds:
                    self.pace[key] = sum(seconds) / len(seconds)
        return self.pace.get(key)

    def fitted(self, task: Task) -> Task | None:
        """``task``, shortened to the whole batches that end before the deadline (None: not even
        one); a shard resumed from an earlier sweep starts whole or not at all."""
        if self.deadline is None or task.spec.kind == MEMORY:
            return task
        left = self.deadline - time.monotonic()
        pace = self.seconds_per_image(task.spec)
        if pace is None:
            return task if left > 0 else None
        if pace * (task.hi - task.lo) <= left:
            return task
        if task.path.exists():
            return None
        batch = _batch(task.spec)
        fits = int(left / pace) // batch * batch
        return Task(task.spec, task.lo, task.lo + fits) if fits > 0 else None

    def start_ready(self) -> None:
        for task in list(self.queue):
            if len(self.running) >= self.engine.capacity:
                return
            key = _key(task.spec.out)
            if self.state.get(key) != PENDING:
                self.queue.remove(task)
                continue
            why = self.blocked(task)
            if why == "wait":
                continue
            self.queue.remove(task)
            if why is not None:  # the run it reads failed
                self.fail(key, why, _key(task.spec.depends) in self.report.retry)
                continue
            fitted = self.fitted(task)
            if fitted is None or fitted.hi < task.hi:
                self.left.append(task if fitted is None else Task(task.spec, fitted.hi, task.hi))
            if fitted is not None:
                self.running[fitted.key] = (fitted, time.monotonic())
                self.engine.submit(fitted)

    # -- what happens -------------------------------------------------------------------------
    def fail(self, key: str, message: str, retry: bool = False) -> None:
        """Mark a run failed (``retry``: the same sweep can complete it later), drop its waiting
        shards, and fail the runs that read it in turn."""
        self.state[key] = FAILED
        self.report.failed[key] = message
        if retry:
            self.report.retry.add(key)
        dropped = [t for t in self.queue if _key(t.spec.out) == key]
        self.queue = [t for t in self.queue if _key(t.spec.out) != key]
        self.failed_shards += len(dropped)
        for other, spec in self.by_out.items():
            if spec.depends is not None and _key(spec.depends) == key and self.state.get(other) == PENDING:
                self.fail(other, f"the run it reads, {Path(key).name}, failed: {message}", retry)

    def finished(self, task: Task, result: dict) -> None:
        _, started = self.running.pop(task.key)
        key = _key(task.spec.out)
        if self.state.get(key) != PENDING:
            return  # its run already failed
        if result["status"] != "done":
            self.failed_shards += 1
            self.fail(key, result["message"], result.get("retry", False))
            return
        try:
            if task.spec.kind == CERTIFY:
                merge_shard(task)
                self.rows_of(key).update(range(task.lo, task.hi))
                self.pace[key] = (time.monotonic() - started) / (task.hi - task.lo)
        except RDDRSError as err:
            self.failed_shards += 1
            self.fail(key, str(err), isinstance(err, Busy))
            return
        self.report.done += 1
        if not any(_key(t.spec.out) == key for t in self.queue + self.left + [t for t, _ in self.running.values()]):
            self.state[key] = DONE
            if task.spec.kind == CERTIFY:
                _remove_stale_shards(task.spec)

    def stop_at_deadline(self) -> None:
        """Stop the shards still running and merge the batches they finished."""
        self.engine.close(cancel=True)
        for task, _ in list(self.running.values()):
            if task.spec.kind == CERTIFY and self.state.get(_key(task.spec.out)) == PENDING:
                merge_shard(task, partial=True)
            self.left.append(task)
        self.running.clear()

    def run(self, progress: bool, poll: float) -> Report:
        tic = time.perf_counter()
        bar = _Progress(self.report.shards, progress)

        def show():
            bar.update(self.report.done, len(self.running), self.failed_shards, len(self.queue) + len(self.left))

        try:
            while self.queue or self.running:
                self.start_ready()
                show()
                if not self.running:
                    for task in self.queue:  # nothing can start: their starts will never come
                        if self.deadline is not None:
                            self.left.append(task)
                        elif self.state.get(_key(task.spec.out)) == PENDING:
                            self.fail(_key(task.spec.out), "the rows it starts from were never computed")
                    self.queue = []
                    break
                timeout = poll if self.deadline is None else max(0.0, min(poll, self.deadline - time.monotonic()))
                for task, result in self.engine.wait(timeout):
                    self.finished(task, result)
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.stop_at_deadline()
                    self.left += self.queue
                    self.queue = []
                show()
        except BaseException:
            self.engine.close(cancel=True)
            bar.close()
            raise
        self.engine.close()
        bar.close()
        self.report.left = len(self.left)
        self.report.seconds = time.perf_counter() - tic
        return self.report


