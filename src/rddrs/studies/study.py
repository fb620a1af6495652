"""The study driver: a study is a list of named variants of the MNIST runs, certified on the
same test images, each into its own resumable result file.

A variant is a method with overrides of its ``Search`` and an optional rotation; a ``Study``
names the variants and their test images ``first .. first+count-1``. ``study_specs`` turns a
study into run specifications (``rddrs.pipeline.runspec``), each ``RESULTS/claims/STUDY/VARIANT.tsv``;
a variant whose settings are the preset's own is the standard run ``RESULTS/METHOD_sigmaS.tsv``,
read rather than recomputed. ANCER and RDDRS variants start from the DDRS variant of their study
with the same rotation (the standard DDRS run when unrotated), or from the variant they name.
``run_study`` computes what is missing and reads every variant (``VariantRun``).

Beside each variant the driver keeps a digest, ``VARIANT.digest.npz``, small enough to commit
(the per-image trace files are not): per image the sorted scales of S (eigenvalues of C,
theta, or sigma), the search's objective trace and sigma_x* of its start. It is rebuilt from
the trace files whenever the rows it was made from (idx, gap) change.

The chapters' studies are data for this driver: ``rddrs.studies.headline`` (chapter 5),
``rddrs.studies.budget`` (chapter 7) and ``rddrs.studies.claims`` (chapter 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from rddrs import RDDRSError
from rddrs.core.methods import method as method_record
from rddrs.core.noise import family_class
from rddrs.pipeline import runspec, shards, sweep
from rddrs.pipeline.data import dataset as dataset_record
from rddrs.pipeline.results import model_path, read_rows, read_sidecar, result_path, traces_dir
from rddrs.pipeline.runspec import RunRequest, RunSpec
from rddrs.pipeline.settings import resolve, run_dataset
from rddrs.studies import analysis


@dataclass(frozen=True)
class Variant:
    """One run of a study: ``method`` with ``search`` overrides (``Search`` fields), rotated
    by the orthogonal matrix of seed ``rotate`` (None: not rotated), its search started from
    the run of the study's variant named ``start`` (None: the DDRS run of the preset's search;
    an ANCER variant can start an RDDRS one). ``tier``: a sweep computes the variants of a lower
    tier (larger number) after the others, chunk by chunk."""

    name: str
    method: str
    search: dict = field(default_factory=dict)
    rotate: int | None = None
    start: str | None = None
    tier: int = 0


@dataclass(frozen=True)
class Study:
    """Named variants certified on test images ``first .. first+count-1``. With ``digests`` the
    digest of each variant is kept as soon as its traces are there (the studies that look at the
    scales of S; the others read rows only and keep none)."""

    name: str
    count: int
    variants: tuple[Variant, ...]
    first: int = 0
    digests: bool = True

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


@dataclass
class VariantRun:
    """A variant's result rows on its study's images (ordered by idx), and its digest: the
    sorted scales of S, the objective trace and sigma_x* per image, read (or built from the
    trace files) only when one of them is asked for."""

    variant: Variant
    path: Path
    results: analysis.Results
    digest: dict | Callable[[], dict]

    @cached_property
    def _digested(self) -> dict:
        return self.digest() if callable(self.digest) else self.digest

    @property
    def spectrum(self) -> np.ndarray:
        """(count, k): sorted scales of S; k = 1 for sigma."""
        return self._digested["spectrum"]

    @property
    def trace(self) -> np.ndarray:
        """(count, iterations): objective H of the method's own search."""
        return self._digested["trace"]

    @property
    def sigma_star(self) -> np.ndarray:
        """(count,): sigma_x* of the start (sigma itself for RS)."""
        return self._digested["sigma_star"]

    def certified(self, kind: str = "proxy") -> np.ndarray:
        """Certified radius per image, 0 where the prediction is wrong or abstains."""
        return analysis.certified_radius(self.results, kind)


def study_dir(results: str | Path, study: Study) -> Path:
    return Path(results) / "claims" / study.name


def start_of(study: Study, variant: Variant) -> Variant:
    """The variant an ANCER or RDDRS variant starts from: the one it names, else the variant of
    its base search (DDRS) with the preset's settings and the same rotation."""
    if variant.start is not None:
        return study.variant(variant.start)
    base = method_record(variant.method).base
    return next(
        (v for v in study.variants if v.method == base and not v.search and v.rotate == variant.rotate),
        Variant(base if variant.rotate is None else f"{base}_rotate{variant.rotate}", base, rotate=variant.rotate),
    )


def study_specs(
    study: Study,
    sigma: float,
    preset: str,
    results: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    data: str | Path = "data",
    models: str | Path = "data/models",
    groups: tuple[str, ...] = ("claims",),
    priority: int = 0,
    dataset: str = "mnist",
) -> dict[str, RunSpec]:
    """The run of every variant of ``study`` (and of the starts it needs that are not variants),
    by variant name: ``RESULTS/claims/STUDY/VARIANT.tsv`` on the study's images, or the
    standard run ``RESULTS/METHOD_sigmaS.tsv`` for a variant with the preset's own settings.
    A run's priority in a sweep is ``priority`` plus its variant's tier (a start's: its
    dependant's). ``dataset``: whose test images and model (``RESULTS``: the folder of its runs)."""
    model_file = model_path(sigma, models, dataset)
    folder = study_dir(results, study)
    images = ((study.first, study.first + study.count),)
    specs: dict[str, RunSpec] = {}

    def spec_of(variant: Variant, tier: int) -> RunSpec:
        if variant.name in specs:
            return specs[variant.name]
        record = method_record(variant.method)
        init = spec_of(start_of(study, variant), tier).out if record.starts else None
        request = RunRequest(
            method=variant.method,
            sigma=float(sigma),
            preset=preset,
            model=str(model_file),
            seed=seed,
            device=device,
            rotate=variant.rotate,
            init=init,
            search=dict(variant.search),
            dataset=dataset,
        )
        standard = replace(
            request,
            rotate=None,
            search={},
            init=str(result_path(results, record.base, sigma)) if init is not None else None,
        )
        is_standard = variant.rotate is None and resolve(request).comparable() == resolve(standard).comparable()
        out = result_path(results, variant.method, sigma) if is_standard else folder / f"{variant.name}.tsv"
        specs[variant.name] = RunSpec.of(
            replace(request, search={}) if is_standard else request,  # the standard run's overrides change nothing
            out,
            ranges=images,
            groups=groups,
            data=str(data),
            priority=priority + tier,
        )
        return specs[variant.name]

    for variant in sorted(study.variants, key=lambda v: v.tier):  # a start shared by tiers takes the first
        spec_of(variant, variant.tier)
    return specs


def run_study(
    study: Study,
    sigma: float,
    preset: str,
    results: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    data: str | Path = "data",
    models: str | Path = "data/models",
    progress: bool = False,
    compute: bool = True,
) -> dict[str, VariantRun]:
    """Certify every variant of ``study`` that is not complete (``study_specs``; in this
    process), then read them all (an image whose search diverged is a row like the others:
    ``VariantRun.results.diverged`` counts them). With ``compute=False`` only read, and say
    which variant is incomplete (e.g. a paper-scale study on a CPU)."""
    specs = study_specs(study, sigma, preset, results, device=device, seed=seed, data=data, models=models)
    wanted = [specs[v.name] for v in study.variants]
    if not compute:
        if incomplete := next((spec for spec in wanted if shards.missing(spec)), None):
            raise RDDRSError(
                f"{incomplete.out} lacks {len(shards.missing(incomplete))} of the study's images: "
                f"compute it (`rddrs sweep --preset {preset}`) before reading it"
            )
    else:
        sweep.execute(runspec.closure(wanted, specs.values()), results=results, progress=progress).check()
    folder = study_dir(results, study)
    done = {}
    for variant in study.variants:
        spec = specs[variant.name]
        done[variant.name] = _read(
            variant, Path(spec.out), None if spec.init is None else Path(spec.init), folder, study
        )
    return done


def _study_images(res: analysis.Results, study: Study) -> analysis.Results:
    keep = np.flatnonzero((res.idx >= study.first) & (res.idx < study.first + study.count))
    if len(keep) != study.count:
        last = study.first + study.count - 1
        raise RDDRSError(f"{res.path} has {len(keep)} of the test images {study.first}..{last}")
    return res.subset(keep)


def _read(variant: Variant, path: Path, init: Path | None, folder: Path, study: Study) -> VariantRun:
    results = _study_images(analysis.read_results(path), study)

    def digest() -> dict:
        stored = folder / f"{variant.name}.digest.npz"
        cached = dict(np.load(stored)) if stored.exists() else {}
        if not (np.array_equal(cached.get("idx"), results.idx) and np.array_equal(cached.get("gap"), results.gap)):
            cached = _digest(variant, path, init, results)
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(stored, **cached)
        return cached

    run = VariantRun(variant, path, results, digest)
    if study.digests and (variant.method == "rs" or all((traces_dir(path) / f"{i}.npz").exists() for i in results.idx)):
        run.spectrum  # the traces are here: keep the digest now, for clones that have only the rows
    return run


def _digest(variant: Variant, path: Path, init: Path | None, results: analysis.Results) -> dict[str, np.ndarray]:
    """Spectra, traces and sigma_x* of the rows of ``results``, from the run's trace files (the
    spectrum of a law kept in the rows, ``in_rows``: its sigma)."""
    record = method_record(variant.method)
    family = family_class(record.family)
    if not record.searched:
        sigma = results.sigma_min[:, None]
        return {
            "idx": results.idx,
            "gap": results.gap,
            "spectrum": sigma.astype(np.float32),
            "trace": np.zeros((results.n, 0)),
            "sigma_star": results.sigma_min,
        }
    folder = traces_dir(path)
    missing = [i for i in results.idx if not (folder / f"{i}.npz").exists()]
    if missing:
        raise RDDRSError(
            f"{folder} lacks the traces of {len(missing)} images (first: {missing[0]}) and no "
            f"digest of these rows exists: restore the digest, or recompute {path.name} elsewhere"
        )
    # the input dimension, which a family's parameter need not show
    d = math.prod(dataset_record(run_dataset(read_sidecar(path)["settings"])).input_shape)
    spectra, traces, stars = [], [], []
    for i, sigma in zip(results.idx, results.sigma_min):
        with np.load(folder / f"{i}.npz") as stored:
            traces.append(stored[variant.method])
            stars.append(float(stored["sigma_star"]) if "sigma_star" in stored else math.nan)
            if family.in_rows:  # S = sigma I: its row has sigma
                spectra.append(np.array([sigma]))
                continue
            if "param" not in stored:
                raise RDDRSError(
                    f"{folder / f'{i}.npz'} holds no 'param' (written by an older rddrs): recompute {path.name}"
                )
            param = torch.as_tensor(stored["param"], dtype=torch.float64)
            spectra.append(family.from_param(param[None], d, check=False).scales()[0].numpy())
    if init is None:  # DDRS: its own sigma
        star = results.sigma_min
    elif not np.isnan(stars).any():  # recorded in the traces since the ANCER start existed
        star = np.array(stars)
    else:  # older traces: a DDRS start's sigma_min
        start = read_rows(init)
        star = np.array([start[i]["sigma_min"] for i in results.idx])
    return {
        "idx": results.idx,
        "gap": results.gap,
        "spectrum": np.stack(spectra).astype(np.float32),
        "trace": np.stack(traces),
        "sigma_star": star,
    }


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over paired images and its standard error."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return float(diff.mean()), se
