"""What a preset needs: every result file that the heavy chapters read, as run specifications.

==========  ====================================================  ==========================
group       runs                                                  read by the chapter
==========  ====================================================  ==========================
standard    the four methods at each sigma                        mnist, budget, soundness
            (``runspec.standard_specs``)
memory      the memory pass over each standard run                soundness
claims      the variants of the claims studies                    claims
            (``rddrs.studies.claims``)
budget      the studies of a smaller budget                       budget
            (``rddrs.studies.budget``)
figure2     the paper's Figure 2 at its own settings              headline
            (``headline.figure2_study``, ``paper`` preset only)
mechanism   the laws behind the headline, with their traces       headline
            (``headline.mechanism_study``; ``rddrs.studies.mechanism``)
==========  ====================================================  ==========================

A sweep starts the figure2 group first, at sigma 0.25, then 0.5, then 0.12, its lower tier
after the rest at each sigma, chunk by chunk (``sweep.execute``), the mechanism study's images
with the first chunk; the other groups come after.

``runs(preset, results)`` lists them (``dataset``: the runs on another dataset than MNIST live in
the sub-folder ``RESULTS/DATASET/``, with their dataset's models); ``rddrs sweep`` computes the missing ones (on this
machine or a Ray cluster) and the chapters call ``ensure`` on their groups, which computes
nothing when everything is there. Filters (sigmas, methods, groups) keep what they name and
the runs it starts from. This module imports nothing heavy; the studies are read when the
list is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.methods import NAMES, method as method_record
from rddrs.core.presets import SIGMAS, STUDY_SIGMA, preset as preset_record
from rddrs.pipeline import runspec, shards, sweep
from rddrs.pipeline.data import dataset as dataset_record
from rddrs.pipeline.results import dataset_folder

GROUPS = ("standard", "memory", "claims", "budget", "figure2", "mechanism")
#: the sweep priority of the groups other than figure2 (figure2's: 10 per sigma, in headline.FIGURE2_SIGMAS order)
LATER = 100


def runs(
    preset: str,
    results: str | Path | None = None,
    *,
    sigmas: Iterable[float] = SIGMAS,
    methods: Iterable[str] = NAMES,
    count: int | None = None,
    groups: Iterable[str] = GROUPS,
    seed: int = 0,
    device: str = "cpu",
    data: str | Path = "data",
    models: str | Path = "data/models",
    dataset: str = "mnist",
) -> list[runspec.RunSpec]:
    """Every run ``preset`` needs in ``results`` (default ``results/PRESET``) on ``dataset``'s test
    images with its models (``results.dataset_folder``: for another dataset than MNIST the files
    are those of the same runs in ``results/DATASET/``), in an order where each comes after the run
    it starts from. ``count`` overrides the number of test images of the standard runs and of the
    claims studies (the budget and headline studies keep their sizes);
    ``sigmas``, ``methods`` and ``groups`` keep only the runs they name, with what those start from.
    The figure2 group's runs hold the whole test set unless ``count`` says otherwise."""
    preset_record(preset)
    dataset = dataset_record(dataset).name
    results = dataset_folder(Path("results") / preset if results is None else Path(results), dataset)
    sigmas = tuple(float(s) for s in sigmas)
    methods = tuple(method_record(m).name for m in methods)
    groups = tuple(groups)
    if unknown := [g for g in groups if g not in GROUPS]:
        raise RDDRSError(f"unknown group {unknown[0]!r}; expected some of {', '.join(GROUPS)}")
    common = dict(seed=seed, device=device, data=data, models=models, dataset=dataset)
    pool: list[runspec.RunSpec] = []
    for sigma in SIGMAS + tuple(s for s in sigmas if s not in SIGMAS):
        if not {"standard", "memory"} & set(groups):
            break  # a study's variant that is a standard run holds its own images only
        standard = [
            replace(s, priority=LATER) for s in runspec.standard_specs(sigma, preset, results, count=count, **common)
        ]
        pool += standard + [replace(runspec.memory_spec(s), priority=LATER) for s in standard]
    for one, sigma, group, priority in _studies(preset, count, groups):
        from rddrs.studies.study import study_specs

        pool += list(study_specs(one, sigma, preset, results, groups=(group,), priority=priority, **common).values())
    pool = runspec.combine(pool)
    by_out = {str(Path(s.out)): s for s in pool}

    def keeps(spec: runspec.RunSpec) -> bool:
        named = by_out[str(Path(spec.source))] if spec.kind == runspec.MEMORY else spec
        return (
            bool(set(spec.groups) & set(groups))
            and named.method in methods
            and any(abs(named.sigma - s) < 1e-9 for s in sigmas)
        )

    return runspec.with_dependencies(runspec.closure([s for s in pool if keeps(s)], pool))


def _studies(preset: str, count: int | None, groups: tuple[str, ...]):
    """(study, sigma, group, sweep priority) of the studies of the chosen groups."""
    if "figure2" in groups and preset == "paper":  # the smaller presets run it in the chapter
        from rddrs.studies import headline

        for rank, sigma in enumerate(headline.FIGURE2_SIGMAS):
            study = headline.figure2_study(preset, sigma)
            if study.variants:
                yield (study if count is None else replace(study, count=count)), sigma, "figure2", 10 * rank
    if "mechanism" in groups:
        from rddrs.studies import headline

        yield headline.mechanism_study(preset), STUDY_SIGMA, "mechanism", 0
    if "claims" in groups:
        from rddrs.studies import claims

        for study in claims.studies(preset, count).values():
            yield study, STUDY_SIGMA, "claims", LATER
    if "budget" in groups:
        from rddrs.studies import budget

        for make in (
            budget.tuning_study,
            budget.variants_study,
            budget.step_size_study,
            budget.frontier_study,
            budget.diagonal_study,
            budget.clamped_study,
            budget.pipeline_parts_study,
        ):
            study = make(preset)
            if study.variants:
                yield study, STUDY_SIGMA, "budget", LATER
        for sigma in SIGMAS:
            study = budget.best_study(preset, sigma)
            if study.variants:
                yield study, sigma, "budget", LATER


def ensure(specs: list[runspec.RunSpec], results: str | Path, progress: bool = False) -> list[runspec.RunSpec]:
    """Compute in this process whatever ``specs`` lack (nothing, when all is there: a sweep did
    it), then return them; the first run that failed is a one-line error."""
    if not shards.complete(specs):
        sweep.execute(specs, results=results, progress=progress).check()
    return specs


def status(specs: Iterable[runspec.RunSpec]) -> list[tuple[runspec.RunSpec, str]]:
    """Each run with its state on disk: complete, or how many images it lacks."""
    rows = []
    for spec in specs:
        lacking = shards.missing(spec)
        if not lacking:
            rows.append((spec, "complete"))
        elif spec.kind == runspec.MEMORY:
            rows.append((spec, "missing" if lacking == [-1] else f"{len(lacking)} rows to go"))
        else:
            rows.append((spec, f"{len(lacking)} of {len(spec.indices())} images missing"))
    return rows
