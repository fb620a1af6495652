"""The paper's other claims as studies: variants of the MNIST runs and their summaries.

A study is a list of named variants (a method, overrides of its ``Search``, a rotation)
certified on the same first ``count`` test images by ``run_certification``, each
into ``RESULTS/claims/STUDY/VARIANT.tsv`` (resumable, cached by preset through RESULTS). A
variant whose settings are the preset's own is the standard run ``RESULTS/METHOD_sigmaS.tsv``
of the mnist chapter, which is read rather than recomputed. ANCER and RDDRS variants start from the
DDRS variant of their study with the same rotation (the standard DDRS run when unrotated).

Beside each variant the driver keeps a digest, ``VARIANT.digest.npz``, small enough to commit
(the per-image trace files are not): per image the sorted scales of S (eigenvalues of C,
theta, or sigma), the search's objective trace and sigma_x* of its start. It is rebuilt from
the trace files whenever the rows it was made from (idx, gap) change.

The studies (``studies``): ``rotation``, ``kappa``, ``floor``, ``samples``, ``isotropy``;
the runtime summary reads the standard runs' timings and measures one RDDRS iteration
(``iteration_cost``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from rddrs import RDDRSError
from rddrs.core import presets, spd
from rddrs.core.methods import ISOTROPIC, NAMES as METHODS, method as method_record
from rddrs.core.noise import FullSPD, Isotropic
from rddrs.core.optimize import objective_and_gradient
from rddrs.pipeline import sweep
from rddrs.pipeline.results import model_path, read_rows, result_path, traces_dir
from rddrs.pipeline.settings import make_settings
from rddrs.studies import analysis, display
from rddrs.studies.labels import label

#: seed of the random orthogonal matrix of the rotation study
ROTATE = 1


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


@dataclass(frozen=True)
class Budget:
    """How much each study computes at a preset."""

    count: int                      # images of the rotation, kappa, floor and isotropy studies
    kappas: tuple[float, ...]
    sample_inputs: int              # images of the samples study
    sample_sizes: tuple[int, ...]   # gradient samples per iteration (even: antithetic pairs)
    repeats: int                    # independent searches per size and draw scheme


# cpu: about 35 min of one busy core (RDDRS ~20 s per image there, mostly eigh/matmuls of C).
BUDGETS = {
    "smoke": Budget(count=2, kappas=(0.0, 1e-6, 1.0), sample_inputs=1, sample_sizes=(8, 32), repeats=2),
    "cpu": Budget(count=8, kappas=(0.0, 1e-6, 1e-2, 1.0, 10.0), sample_inputs=2,
                  sample_sizes=(250, 1000, 4000), repeats=3),
    "paper": Budget(count=100, kappas=(0.0, 1e-6, 1e-2, 1.0, 10.0), sample_inputs=3,
                    sample_sizes=(1000, 5000, 20_000), repeats=5),
}


def studies(preset: str, count: int | None = None, rotate: int = ROTATE) -> dict[str, Study]:
    """The five computed studies at ``preset``'s budget (``count`` overrides its image count)."""
    if preset not in BUDGETS:
        raise RDDRSError(f"unknown preset {preset!r}; expected one of {', '.join(BUDGETS)}")
    budget = BUDGETS[preset]
    count = budget.count if count is None else int(count)
    if count < 1:
        raise RDDRSError(f"count must be >= 1, got {count}")
    rddrs = presets.PRESETS[preset].search["rddrs"]
    draws = {False: "plain", True: "antithetic"}
    return {study.name: study for study in (
        Study("rotation", count, tuple(Variant(m, m) for m in METHODS)
              + tuple(Variant(f"{m}_rotated", m, rotate=rotate) for m in METHODS)),
        Study("kappa", count, tuple(Variant(f"kappa_{k:g}", "rddrs", {"kappa": k}) for k in budget.kappas)),
        Study("floor", count, (Variant("floor", "rddrs"), Variant("no_floor", "rddrs", {"floor": False}))),
        Study("samples", min(count, budget.sample_inputs), tuple(
            Variant(f"m{m}_{draws[a]}_r{r}", "rddrs", {"samples": m, "antithetic": a, "repeat": r})
            for m in budget.sample_sizes for a in draws for r in range(budget.repeats))),
        Study("isotropy", count, (Variant("rddrs", "rddrs"), Variant("ancer", "ancer"),
                                  Variant("ancer_equal_budget", "ancer",
                                          {"iterations": rddrs.iterations, "samples": rddrs.samples}))),
    )}


# -- the driver ----------------------------------------------------------------------------

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


def _start_of(study: Study, variant: Variant) -> Variant:
    """The variant an ANCER or RDDRS variant starts from: the one it names, else the variant of
    its base search (DDRS) with the preset's settings and the same rotation."""
    if variant.start is not None:
        return study.variant(variant.start)
    base = method_record(variant.method).base
    return next((v for v in study.variants if v.method == base and not v.search and v.rotate == variant.rotate),
                Variant(base if variant.rotate is None else f"{base}_rotate{variant.rotate}", base,
                        rotate=variant.rotate))


def study_specs(study: Study, sigma: float, preset: str, results: str | Path, *, device: str = "cpu",
                seed: int = 0, data: str | Path = "data", models: str | Path = "data/models",
                groups: tuple[str, ...] = ("claims",), priority: int = 0,
                dataset: str = "mnist") -> dict[str, sweep.RunSpec]:
    """The run of every variant of ``study`` (and of the starts it needs that are not variants),
    by variant name: ``RESULTS/claims/STUDY/VARIANT.tsv`` on the study's images, or the
    standard run ``RESULTS/METHOD_sigmaS.tsv`` for a variant with the preset's own settings.
    A run's priority in a sweep is ``priority`` plus its variant's tier (a start's: its
    dependant's). ``dataset``: whose test images and model (``RESULTS``: the folder of its runs)."""
    model_file = model_path(sigma, models, dataset)
    folder = study_dir(results, study)
    images = ((study.first, study.first + study.count),)
    specs: dict[str, sweep.RunSpec] = {}

    def spec_of(variant: Variant, tier: int) -> sweep.RunSpec:
        if variant.name in specs:
            return specs[variant.name]
        record = method_record(variant.method)
        init = spec_of(_start_of(study, variant), tier).out if record.starts else None
        settings = make_settings(variant.method, sigma, model_file, preset, seed=seed, device=device,
                                             rotate=variant.rotate, init=init, search=variant.search or None,
                                             dataset=dataset)
        standard = make_settings(
            variant.method, sigma, model_file, preset, seed=seed, device=device,
            init=result_path(results, record.base, sigma) if init is not None else None, dataset=dataset)
        is_standard = variant.rotate is None and settings.comparable() == standard.comparable()
        out = result_path(results, variant.method, sigma) if is_standard else folder / f"{variant.name}.tsv"
        specs[variant.name] = sweep.RunSpec(
            str(out), method=variant.method, sigma=float(sigma), preset=preset, model=str(model_file),
            ranges=images, seed=seed, device=device, rotate=variant.rotate,
            search={} if is_standard else dict(variant.search),  # the standard run's overrides change nothing
            init=None if init is None else str(init), groups=groups, data=str(data),
            priority=priority + tier, dataset=dataset)
        return specs[variant.name]

    for variant in sorted(study.variants, key=lambda v: v.tier):  # a start shared by tiers takes the first
        spec_of(variant, variant.tier)
    return specs


def run_study(study: Study, sigma: float, preset: str, results: str | Path, *, device: str = "cpu",
              seed: int = 0, data: str | Path = "data", models: str | Path = "data/models",
              progress: bool = False, compute: bool = True) -> dict[str, VariantRun]:
    """Certify every variant of ``study`` that is not complete (``study_specs``; in this
    process), then read them all (an image whose search diverged is a row like the others:
    ``VariantRun.results.diverged`` counts them). With ``compute=False`` only read, and say
    which variant is incomplete (e.g. a paper-scale study on a CPU)."""
    specs = study_specs(study, sigma, preset, results, device=device, seed=seed, data=data, models=models)
    wanted = [specs[v.name] for v in study.variants]
    if not compute:
        if incomplete := next((spec for spec in wanted if sweep.missing(spec)), None):
            raise RDDRSError(f"{incomplete.out} lacks {len(sweep.missing(incomplete))} of the study's images: "
                             f"compute it (`rddrs sweep --preset {preset}`) before reading it")
    else:
        sweep.execute(sweep.closure(wanted, specs.values()), results=results, progress=progress).check()
    folder = study_dir(results, study)
    done = {}
    for variant in study.variants:
        spec = specs[variant.name]
        done[variant.name] = _read(variant, Path(spec.out), None if spec.init is None else Path(spec.init),
                                   folder, study)
    return done


def _study_images(res: analysis.Results, study: Study) -> analysis.Results:
    keep = np.flatnonzero((res.idx >= study.first) & (res.idx < study.first + study.count))
    if len(keep) != study.count:
        raise RDDRSError(f"{res.path} has {len(keep)} of the test images {study.first}..{study.first + study.count - 1}")
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
    if study.digests and (variant.method == "rs"
                          or all((traces_dir(path) / f"{i}.npz").exists() for i in results.idx)):
        run.spectrum  # the traces are here: keep the digest now, for clones that have only the rows
    return run


def _digest(variant: Variant, path: Path, init: Path | None, results: analysis.Results) -> dict[str, np.ndarray]:
    """Spectra, traces and sigma_x* of the rows of ``results``, from the run's trace files."""
    record = method_record(variant.method)
    if not record.searched:
        sigma = results.sigma_min[:, None]
        return {"idx": results.idx, "gap": results.gap, "spectrum": sigma.astype(np.float32),
                "trace": np.zeros((results.n, 0)), "sigma_star": results.sigma_min}
    folder = traces_dir(path)
    missing = [i for i in results.idx if not (folder / f"{i}.npz").exists()]
    if missing:
        raise RDDRSError(f"{folder} lacks the traces of {len(missing)} images (first: {missing[0]}) and no "
                         f"digest of these rows exists: restore the digest, or recompute {path.name} elsewhere")
    spectra, traces, stars = [], [], []
    for i, sigma in zip(results.idx, results.sigma_min):
        with np.load(folder / f"{i}.npz") as stored:
            traces.append(stored[variant.method])
            stars.append(float(stored["sigma_star"]) if "sigma_star" in stored else math.nan)
            if record.family == ISOTROPIC:  # S = sigma I: its row has sigma
                spectra.append(np.array([sigma]))
                continue
            if "param" not in stored:
                raise RDDRSError(f"{folder / f'{i}.npz'} holds no 'param' (written by an older rddrs): "
                                 f"recompute {path.name}")
            param = torch.as_tensor(stored["param"], dtype=torch.float64)
            spectra.append((spd.eigh(param)[0] if param.dim() == 2 else param.reshape(-1).sort().values).numpy())
    if init is None:  # DDRS: its own sigma
        star = results.sigma_min
    elif not np.isnan(stars).any():  # recorded in the traces since the ANCER start existed
        star = np.array(stars)
    else:  # older traces: a DDRS start's sigma_min
        start = read_rows(init)
        star = np.array([start[i]["sigma_min"] for i in results.idx])
    return {"idx": results.idx, "gap": results.gap, "spectrum": np.stack(spectra).astype(np.float32),
            "trace": np.stack(traces), "sigma_star": star}


# -- measures ------------------------------------------------------------------------------

def isotropy_split(scales, start) -> dict[str, np.ndarray]:
    """How far S moved from ``start * I`` in the affine-invariant geometry, and how much of it
    is a change of shape rather than of size.

    ``scales``: eigenvalues (B, d) (theta for a diagonal S) or SPD matrices (B, d, d); ``start``
    one number or (B,). With ``l = log w`` (w: eigenvalues) and ``m`` its mean,
    ``dist(S, t I)^2 = sum_i (l_i - log t)^2`` is smallest at ``log t = m`` (t = det(S)^(1/d)):

    * ``anisotropic = ||l - m||_2 = sqrt(d) std(l)``, the distance to the nearest multiple of I;
    * ``total = ||l - log start||_2 = dist(S, start I)``;
    * ``isotropic = sqrt(d) |m - log start|``, with ``total^2 = anisotropic^2 + isotropic^2``;
    * ``relative = anisotropic / total`` (0: S only grew or shrank uniformly).

    All are invariant under ``S -> Q S Q^T`` for orthogonal Q (only the eigenvalues enter).
    """
    scales = torch.as_tensor(scales, dtype=torch.float64)
    w = torch.linalg.eigvalsh(spd.sym(scales)) if scales.dim() == 3 else scales
    if w.dim() != 2 or not (w > 0).all():
        raise RDDRSError(f"isotropy_split needs positive eigenvalues (B, d) or SPD matrices (B, d, d), "
                         f"got shape {tuple(scales.shape)}")
    log_w = w.log().numpy()
    centre = log_w.mean(-1)
    log_start = np.log(np.broadcast_to(np.asarray(start, dtype=np.float64), centre.shape))
    anisotropic = np.sqrt(((log_w - centre[:, None]) ** 2).sum(-1))
    total = np.sqrt(((log_w - log_start[:, None]) ** 2).sum(-1))
    isotropic = math.sqrt(log_w.shape[-1]) * np.abs(centre - log_start)
    relative = np.divide(anisotropic, total, out=np.zeros_like(total), where=total > 0)
    return {"anisotropic": anisotropic, "isotropic": isotropic, "total": total, "relative": relative}


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over paired images and its standard error."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return float(diff.mean()), se


def _quartiles(values: np.ndarray) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


# -- summaries: one list of rows per study -------------------------------------------------

def rotation_table(runs: dict[str, VariantRun], radii=(0.5, 1.0, 1.5)) -> list[dict]:
    """Per method: proxy radius (mean = ACR, median) and certified accuracy at ``radii``,
    original vs rotated, and the paired difference of the proxy radius (rotated - original)."""
    rows = []
    for method in METHODS:
        original, rotated = runs[method], runs[f"{method}_rotated"]
        row = {"method": method, "n": original.results.n}
        for tag, run in (("original", original), ("rotated", rotated)):
            radius = run.certified("proxy")
            row[f"mean_{tag}"], row[f"median_{tag}"] = float(radius.mean()), float(np.median(radius))
            row[f"ca_{tag}"] = analysis.certified_accuracy(run.results, radii, "proxy")
        row["difference"], row["se"] = paired_difference(rotated.certified("proxy"), original.certified("proxy"))
        rows.append(row)
    return rows


def distribution_table(runs: dict[str, VariantRun], reference: str) -> list[dict]:
    """Per variant: quartiles of the proxy and l2 radii, mean final objective, and the paired
    difference of the proxy and l2 radii against the variant ``reference``."""
    rows = []
    for name, run in runs.items():
        row = {"variant": name, "n": run.results.n}
        for kind in analysis.KINDS:
            radius = run.certified(kind)
            row[f"{kind}_q"] = _quartiles(radius)
            row[f"{kind}_mean"] = float(radius.mean())
            row[f"{kind}_difference"] = paired_difference(radius, runs[reference].certified(kind))
        row["objective"] = float(run.trace[:, -1].mean()) if run.trace.shape[1] else math.nan
        row["min_scale_ratio"] = run.spectrum[:, 0] / run.sigma_star
        rows.append(row)
    return rows


def samples_table(runs: dict[str, VariantRun]) -> list[dict]:
    """Per (samples, draws): spread over the repeated searches of the final proxy radius and of
    the final objective estimate (per image, then averaged over images), and seconds per image."""
    groups: dict[tuple, list[VariantRun]] = {}
    for run in runs.values():
        s = run.variant.search
        groups.setdefault((s["samples"], s["antithetic"]), []).append(run)
    rows = []
    for (samples, antithetic), members in sorted(groups.items()):
        proxy = np.stack([r.certified("proxy") for r in members])  # (repeats, images)
        final = np.stack([r.trace[:, -1] for r in members])
        q1, q3 = np.percentile(proxy, [25, 75], axis=0)
        rows.append({"samples": samples, "antithetic": antithetic, "repeats": len(members),
                     "images": proxy.shape[1], "proxy_mean": float(proxy.mean()),
                     "proxy_std": float(proxy.std(0, ddof=1).mean()) if len(members) > 1 else math.nan,
                     "proxy_iqr": float((q3 - q1).mean()),
                     "objective_std": float(final.std(0, ddof=1).mean()) if len(members) > 1 else math.nan,
                     "seconds": float(np.mean([r.results.seconds.mean() for r in members]))})
    return rows


def isotropy_table(runs: dict[str, VariantRun]) -> list[dict]:
    """Per variant: medians over images of the isotropy split from sigma_x* I, and the ACRs."""
    rows = []
    for name, run in runs.items():
        split = isotropy_split(run.spectrum.astype(np.float64), run.sigma_star)
        rows.append({"variant": name, "n": run.results.n, **{k: float(np.median(v)) for k, v in split.items()},
                     "proxy_acr": float(run.certified("proxy").mean()), "l2_acr": float(run.certified("l2").mean())})
    return rows


def runtime_table(result_dirs: dict[str, Path], sigma: float) -> list[dict]:
    """Seconds per image of each method's standard run in each preset's results folder (those
    that exist); ANCER and RDDRS also with the DDRS search they start from."""
    rows = []
    for preset, folder in result_dirs.items():
        seconds = {}
        for method in METHODS:
            path = result_path(folder, method, sigma)
            if path.exists():
                res = analysis.read_results(path)
                seconds[method] = (res.n, float(res.seconds.mean()))
        for method, (n, own) in seconds.items():
            base = method_record(method).base
            start = seconds.get(base, (0, math.nan))[1] if base else 0.0
            rows.append({"preset": preset, "method": method, "n": n, "seconds": own, "with_start": own + start})
    return rows


def iteration_cost(model, x: torch.Tensor, sigma_star: float, samples: int, kappa: float = 1e-6,
                   max_step: float | None = None, repeat: int = 3, seed: int = 0) -> dict[str, float]:
    """Wall time of one RDDRS iteration on the inputs ``x`` (best of ``repeat``), split into
    the network passes (forward and backward to the inputs, ``samples`` noisy copies each) and
    the rest (noise products, gradient assembly, eigendecompositions, exponential map, floor).

    C is a generic SPD matrix with eigenvalues in [sigma_star, 2 sigma_star] in random axes.
    """
    b, d = len(x), x[0].numel()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    axes = spd.random_orthogonal(d, seed=seed).to(x)
    spectrum = sigma_star * (1 + torch.rand(b, d, generator=gen, device=x.device, dtype=x.dtype))
    law = FullSPD(spd.from_eig(spectrum, axes.expand(b, d, d)), check=False)
    eps = torch.randn(b, samples, d, generator=gen, device=x.device, dtype=x.dtype)
    noisy = Isotropic(torch.full((b,), sigma_star, dtype=x.dtype, device=x.device), d).scale_noise(
        eps, x.reshape(b, 1, d)).reshape(b * samples, *x.shape[1:])

    def iteration():
        _, grad = objective_and_gradient(model, x, law, eps, kappa)
        return law.step(grad, max_step).floor(sigma_star).eig  # and the next iteration's eigendecomposition

    def network():
        leaf = noisy.detach().requires_grad_(True)
        torch.autograd.grad(torch.log_softmax(model(leaf), -1)[:, 0].sum(), leaf)

    matrix = law.param[0]
    total, net = _best_time(iteration, repeat), _best_time(network, repeat)
    return {"total": total / b, "network": net / b, "rest": (total - net) / b,
            "eigh": _best_time(lambda: torch.linalg.eigh(matrix), repeat), "threads": torch.get_num_threads()}


def _best_time(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after a warm-up call (device work included)."""
    def timed():
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    return min(timed() for _ in range(repeat))


# -- figures -------------------------------------------------------------------------------

def _figure(ncols: int, height: float = 2.9):
    """A figure of ``ncols`` panels across the page, in the book's style (``rddrs.studies.display``)."""
    width = display.PAGE_WIDTH if ncols > 1 else 0.62 * display.PAGE_WIDTH
    fig, axes = display.new_figure(1, ncols, height=height, width=width, squeeze=False)
    return fig, axes[0]


def _styles(runs: dict[str, VariantRun]) -> dict[str, dict]:
    """Each variant's colour, dashes and marker: its method's, in shades when a method has several."""
    return dict(zip(runs, display.variant_styles([run.variant.method for run in runs.values()])))


def curves_figure(runs: dict[str, VariantRun], title: str = ""):
    """Certified accuracy against the proxy and the l2 radius, one line per variant."""
    with display.style_context():
        fig, axes = _figure(2)
        styles = _styles(runs)
        for ax, kind in zip(axes, analysis.KINDS):
            for name, run in runs.items():
                x, y = analysis.certified_accuracy_curve(run.results, kind)
                ax.step(x, y, where="pre", label=label(run.variant), linewidth=1.8, color=styles[name]["color"],
                        linestyle=styles[name]["linestyle"])
            ax.set(xlabel=analysis.AXIS_LABELS[kind], ylabel="certified accuracy", ylim=(0, 1.02))
            ax.grid(True)
        axes[1].set_ylabel("")
        if title:
            fig.suptitle(title)
        axes[0].legend()
    return fig


def traces_figure(runs: dict[str, VariantRun]):
    """Objective H per iteration: median over images and the interquartile band, per variant;
    and lambda_min(S) / sigma_x* per image at the end."""
    with display.style_context():
        fig, (left, right) = _figure(2)
        styles = _styles(runs)
        for name, run in runs.items():
            q1, q2, q3 = np.percentile(run.trace, [25, 50, 75], axis=0)
            steps = np.arange(1, run.trace.shape[1] + 1)
            color = styles[name]["color"]
            left.plot(steps, q2, label=label(run.variant), color=color, linestyle=styles[name]["linestyle"])
            left.fill_between(steps, q1, q3, color=color, alpha=0.2)
            right.plot(run.results.idx, run.spectrum[:, 0] / run.sigma_star, styles[name]["marker"],
                       color=color, label=label(run.variant))
        left.set(xlabel="iteration", ylabel="objective H (median, IQR)")
        right.axhline(1.0, color="0.5", linewidth=0.8)
        right.set(xlabel="test image", ylabel=r"$\lambda_{\min}(C) \,/\, \sigma^*_x$")
        right.xaxis.get_major_locator().set_params(integer=True)
        left.legend()
    return fig


def samples_figure(runs: dict[str, VariantRun]):
    """Final proxy radius of every repeated search against the number of gradient samples."""
    with display.style_context():
        fig, axes = _figure(1)
        ax = axes[0]
        plain, pairs = display.variant_styles(["rddrs", "rddrs"])
        styles = {False: plain, True: pairs}
        offsets = {False: 0.97, True: 1.03}  # side by side on the log axis
        labelled = set()
        for run in runs.values():
            s = run.variant.search
            label = None if s["antithetic"] in labelled else ("antithetic pairs" if s["antithetic"] else "plain draws")
            labelled.add(s["antithetic"])
            style = styles[s["antithetic"]]
            ax.plot(np.full(run.results.n, s["samples"] * offsets[s["antithetic"]]), run.certified("proxy"),
                    style["marker"], color=style["color"], alpha=0.8, label=label)
        sizes = sorted({run.variant.search["samples"] for run in runs.values()})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(m) for m in sizes])
        ax.minorticks_off()
        ax.set(xlabel="gradient samples per iteration", ylabel="certified proxy radius")
        ax.grid(True)
        ax.legend()
    return fig


def isotropy_figure(runs: dict[str, VariantRun]):
    """Per image: the distance travelled from sigma_x* I against its anisotropic part (log axes)."""
    with display.style_context():
        fig, axes = _figure(1, height=3.2)
        ax = axes[0]
        styles = _styles(runs)
        splits = {name: isotropy_split(run.spectrum.astype(np.float64), run.sigma_star)
                  for name, run in runs.items()}
        for name, split in splits.items():
            ax.plot(split["total"], split["anisotropic"], styles[name]["marker"], color=styles[name]["color"],
                    label=label(runs[name].variant), alpha=0.8)
        moved = np.concatenate([split["total"] for split in splits.values()])
        moved = moved[moved > 0]
        if moved.size:
            ax.plot([moved.min(), moved.max()], [moved.min(), moved.max()], color="0.5", linewidth=0.8,
                    label="all anisotropic")
        ax.set(xscale="log", yscale="log", xlabel=r"$\mathrm{dist}(S, \sigma^*_x I)$",
               ylabel=r"$\min_t \mathrm{dist}(S, t I)$")
        ax.grid(True)
        ax.legend()
    return fig
