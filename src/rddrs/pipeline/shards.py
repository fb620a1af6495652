"""Shards: how the missing test images of a run are cut into tasks, and joined back.

The missing test images of a certification are cut into shards at multiples of the shard size
(rounded to a multiple of the run's inputs per batch, so that a shard batches its images as one
uninterrupted run does and its rows are the same, bit for bit; the noise streams are keyed by
test index). A shard (``Task``) is the same run over a sub-range, written to
``OUT.shards/LO-HI.tsv`` (with its sidecar and traces) by ``rddrs.pipeline.runs.run_certification``,
so it resumes from its flushed rows when it is run again, for instance after its worker was
killed. When a shard is complete, ``merge_shard`` joins it into ``OUT`` (under OUT's lock, with
the checks of ``rddrs merge``: the same settings, no row twice) and removes it. A shard file left
by an interrupted sweep is picked up by the next ``plan``, and a shard whose rows are all in
``OUT`` already is never run. A memory pass is one task.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rddrs import RDDRSError
from rddrs.pipeline.files import exclusive
from rddrs.pipeline.results import read_rows, read_sidecar, sidecar_path, traces_dir
from rddrs.pipeline.runspec import MEMORY, RunSpec


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


def batch_of(spec: RunSpec) -> int:
    """The run's inputs per batch (a shard is a whole number of them)."""
    from rddrs.pipeline.settings import default_inputs_per_batch

    return spec.inputs_per_batch or default_inputs_per_batch(spec.settings())


def _shard_size(spec: RunSpec, size: int | None) -> int:
    """``size`` rounded down to a multiple of the run's inputs per batch (at least one batch)."""
    if size is None:
        return 1 << 62
    batch = batch_of(spec)
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
        remove_stale_shards(spec)
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


def remove_stale_shards(spec: RunSpec) -> None:
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
