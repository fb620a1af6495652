"""The paper fill: Figure 2's missing panels computed image by image in a machine's idle time.

``fill`` runs the figure2 group at the paper preset for some training sigmas (default 0.5 and
0.12), one test image at a time with every paired run of that image (``headline.PAIRED``: RS, the
authors' clamped DDRS, ANCER and RDDRS, the capped DDRS, and ANCER at the paper's other step
size) done before the next image. Each sigma takes its images in ``order`` (first the images of
sigma 0.25's paired rows, ascending, then the rest of the test set), and the sigmas alternate,
each at its own next image; with ``processes`` K, up to K of them are computed side by side in the
sweep's local pool of processes. It holds the results
folder's sweep lock throughout (a second fill or sweep there is refused in one line), starts no
image that its files' pace says would end after the deadline, and, with ``commit``, commits
each image's rows to the repository that holds them. Rows are flushed as their batches end and a
run resumes from its shard, so a fill killed at any moment loses no finished row and the same
command continues from the rows on disk. The laws' traces (``OUT.traces/``) stay beside the rows
for the memory pass; git ignores them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.presets import OTHER_SIGMAS, STUDY_SIGMA
from rddrs.pipeline.provenance import git
from rddrs.pipeline.results import model_path, read_rows

# the studies (and torch) are imported where they are used, so that the command line's parser
# reads this module's defaults without them

#: the panels the fill computes by default, largest sigma first (sigma 0.25's rows came first)
SIGMAS = OTHER_SIGMAS
#: the panel whose images set the order
LEAD_SIGMA = STUDY_SIGMA
#: the preset of Figure 2's rows (another one serves tests)
PRESET = "paper"


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """A deadline given as ``HH:MM`` (today, local time) or an ISO date and time; it must lie in
    the future."""
    now = now or datetime.now()
    try:
        if len(text) <= 5 and ":" in text:
            hour, minute = (int(part) for part in text.split(":"))
            when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        else:
            when = datetime.fromisoformat(text)
    except ValueError:
        raise RDDRSError(f"cannot read the deadline {text!r}; give HH:MM (today) or an ISO date and time") from None
    if when.tzinfo is not None:
        when = when.astimezone().replace(tzinfo=None)
    if when <= now:
        raise RDDRSError(f"the deadline {when:%Y-%m-%d %H:%M} has passed; give a time to come")
    return when


def specs(
    results: str | Path, sigma: float, index: int, *, preset: str = PRESET, data="data", models="data/models"
) -> list:
    """The paired variants' runs (``runspec.RunSpec``) of one test image at ``sigma`` (with the starts
    they read)."""
    from rddrs.pipeline import runspec
    from rddrs.studies.headline import PAIRED, figure2_study
    from rddrs.studies.study import study_specs

    every = study_specs(
        figure2_study(preset, sigma), sigma, preset, results, data=data, models=models, groups=("figure2",)
    )
    wanted = runspec.closure([every[name] for name in PAIRED], every.values())
    return [replace(spec, ranges=((index, index + 1),)) for spec in wanted]


def order(results: str | Path, test_size: int, *, preset: str = PRESET, data="data", models="data/models") -> list[int]:
    """Test indices: those of sigma 0.25's paired rows ascending (the images every panel shares
    first), then the rest of the test set ascending."""
    from rddrs.studies.headline import PAIRED, figure2_study
    from rddrs.studies.study import study_specs

    study = study_specs(figure2_study(preset, LEAD_SIGMA), LEAD_SIGMA, preset, results, data=data, models=models)
    first = sorted(set.intersection(*(set(read_rows(study[name].out)) for name in PAIRED)))
    first = [i for i in first if i < test_size]
    taken = set(first)
    return first + [i for i in range(test_size) if i not in taken]


def estimate(runs: list, lead: list) -> float:
    """Seconds one image of ``runs`` takes on a CPU: the mean of each run's CPU rows, or of the
    same variant's rows at sigma 0.25 where the run has none yet (0 where neither has)."""
    from rddrs.studies.headline import pace

    total = 0.0
    for spec, other in zip(runs, lead):
        seen = pace(spec.out).get("cpu") if Path(spec.out).exists() else None
        if seen is None and Path(other.out).exists():
            seen = pace(other.out).get("cpu")
        total += seen or 0.0
    return total


@dataclass
class Report:
    """What a fill did: images completed per sigma, seconds each took, and why it stopped."""

    images: dict[float, list[int]] = field(default_factory=dict)
    seconds: dict[float, list[float]] = field(default_factory=dict)
    stopped: str = ""

    def summary(self) -> str:
        done = ", ".join(
            f"sigma {s:g}: {len(v)} images" + (f" ({sum(self.seconds[s]) / len(v):.0f} s each)" if v else "")
            for s, v in self.images.items()
        )
        return f"{done or 'nothing computed'}; {self.stopped}"


def commit_rows(runs: list, message: str, tries: int = 5) -> bool:
    """Commit the result files (and sidecars) of ``runs`` to the repository that holds them,
    nothing else; False where they are in none or git stays busy."""
    files = [p for spec in runs for p in (Path(spec.out), Path(spec.out + ".json")) if p.exists()]
    if not files:
        return False
    where = files[0].resolve().parent
    if git("rev-parse", "--show-toplevel", cwd=where) is None:
        return False
    names = [str(p.resolve()) for p in files]
    for attempt in range(tries):
        if git("add", "--", *names, cwd=where) is not None and (
            git("diff", "--cached", "--quiet", "--", *names, cwd=where) is not None
            or git("commit", "--quiet", "-m", message, "--", *names, cwd=where) is not None
        ):
            return True
        time.sleep(2 * (attempt + 1))  # another git command holds the index
    return False


def fill(
    results: str | Path,
    deadline: datetime,
    *,
    sigmas=SIGMAS,
    threads: int = 1,
    processes: int = 1,
    commit: bool = False,
    images: int | None = None,
    preset: str = PRESET,
    data="data",
    models="data/models",
    log=print,
) -> Report:
    """Compute the paired runs of ``sigmas`` image by image until ``deadline`` (see the module), or
    until ``images`` test images of each sigma have been computed by this call. With ``processes``
    above 1 the sigmas' next images are computed side by side in that many worker processes (at
    most cores // threads), which end with this one, however it ends."""
    from rddrs.pipeline import engines, shards, sweep
    from rddrs.pipeline.data import load_dataset

    results = Path(results)
    sigmas = tuple(float(s) for s in sigmas)
    for sigma in sigmas:
        if not model_path(sigma, models).exists():
            raise RDDRSError(f"no model for sigma {sigma:g}: {model_path(sigma, models)} is missing")
    test_size = len(load_dataset(Path(data), train=False)[1])
    report = Report(images={s: [] for s in sigmas}, seconds={s: [] for s in sigmas})
    engine = engines.Inline(threads) if processes == 1 else engines.Local(processes, threads)
    where = dict(preset=preset, data=data, models=models)
    base = {sigma: specs(results, sigma, 0, **where) for sigma in (*sigmas, LEAD_SIGMA)}  # settings hashed once

    def at(runs: list, index: int) -> list:
        return [replace(spec, ranges=((index, index + 1),)) for spec in runs]

    indices, position = order(results, test_size, **where), dict.fromkeys(sigmas, 0)

    def pending(sigma: float) -> int | None:
        """The first image of ``indices`` whose runs at ``sigma`` are incomplete (None: none is)."""
        while position[sigma] < len(indices) and shards.complete(at(base[sigma], indices[position[sigma]])):
            position[sigma] += 1
        return indices[position[sigma]] if position[sigma] < len(indices) else None

    with sweep.sweep_lock(results):
        while True:
            wanted = [s for s in sigmas if images is None or len(report.images[s]) < images]
            todo = [(s, index) for s in wanted if (index := pending(s)) is not None]
            if not todo:
                report.stopped = f"{images} images per sigma computed" if not wanted else "every test image is done"
                return report
            for group in (todo[i : i + engine.capacity] for i in range(0, len(todo), engine.capacity)):
                runs = {sigma: at(base[sigma], index) for sigma, index in group}
                left = (deadline - datetime.now()).total_seconds()
                each = [estimate(runs[sigma], at(base[LEAD_SIGMA], index)) for sigma, index in group]
                need = max(max(each), sum(each) / engine.capacity)
                if left <= need:
                    report.stopped = (
                        "stopped before {} (needs about {:.0f} s, {:.0f} s left before the deadline)".format(
                            " and ".join(f"image {index} at sigma {sigma:g}" for sigma, index in group),
                            need,
                            max(left, 0),
                        )
                    )
                    return report
                started = time.monotonic()
                done = sweep.execute([spec for sigma, _ in group for spec in runs[sigma]], engine).check()
                seconds = time.monotonic() - started
                beside = f" beside {len(group) - 1} other sigma(s)" if len(group) > 1 else ""
                for sigma, index in group:
                    if not shards.complete(runs[sigma]):  # the other sigmas' rows are still recorded
                        report.stopped = f"image {index} at sigma {sigma:g} is incomplete ({done.summary()})"
                        continue
                    report.images[sigma].append(index)
                    report.seconds[sigma].append(seconds)
                    committed = commit and commit_rows(
                        runs[sigma],
                        f"Figure 2 fill, {preset} preset: test image {index} at sigma "
                        f"{sigma:g} ({seconds:.0f} s{beside}, {threads} thread(s))",
                    )
                    log(
                        f"sigma {sigma:g}, image {index}: {seconds:.0f} s{beside}"
                        + (", committed" if committed else "")
                    )
                if report.stopped:
                    return report
