"""The sweep: compute whatever a list of runs (``rddrs.pipeline.runspec``) lacks, shard by shard
(``rddrs.pipeline.shards``), on an engine (``rddrs.pipeline.engines``), and report what it did.

Order. A certification whose search starts from another run (``init``) waits for the rows it
starts from, shard by shard; a memory pass waits for its whole certification. An image whose
search diverges is a row like any other (``search`` says ``diverged@ITER``); an error fails its
run (and blocks its dependants) while the rest goes on.

Engines only run ``engines.run_task``: the driver plans, merges and reports, so a shard's output
is the same whichever engine ran it. With a deadline, no shard starts that would not end in time,
and what is left is reported for the same call to continue later.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rddrs import RDDRSError
from rddrs.pipeline.engines import Inline
from rddrs.pipeline.files import Busy, ensure_dir, exclusive
from rddrs.pipeline.provenance import row_writers
from rddrs.pipeline.results import read_rows, read_sidecar
from rddrs.pipeline.runspec import CERTIFY, MEMORY, RunSpec, with_dependencies
from rddrs.pipeline.shards import Task, batch_of, merge_shard, plan, remove_stale_shards


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
        text = (
            f"{self.runs} runs: {self.complete_before} complete before, {self.done} of {self.shards} "
            f"shards computed in {self.seconds:.1f} s"
        )
        if self.left:
            text += f", {self.left} left for the next sweep (time was up)"
        if self.failed:
            text += f", {len(self.failed)} failed"
        return text


class _Progress:
    """A bar over shards: done, running, failed and left, with tqdm's estimate of the time left."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="shard", desc="sweep", disable=not enabled or total == 0, dynamic_ncols=True)
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
                raise Busy(
                    f"another sweep is computing runs in {results}; wait for it to end "
                    f"(the runs it leaves missing can then be computed)"
                ) from None
            yield

    return held()


def execute(
    specs: Iterable[RunSpec],
    engine=None,
    *,
    shard_size: int | None = None,
    results: str | Path | None = None,
    progress: bool = False,
    poll: float = 0.5,
    until: float | None = None,
) -> Report:
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
                seconds = [
                    r["seconds"] for i, r in rows.items() if str(writers.get(i, {}).get("device", "")).startswith(kind)
                ]
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
        batch = batch_of(task.spec)
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
                remove_stale_shards(task.spec)

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
