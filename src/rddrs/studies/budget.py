"""Chapter 7, what happens at a smaller budget: does the Riemannian search beat the diagonal one
when every data-dependent method gets its best shot?

Every study is data for ``rddrs.studies.study.run_study`` (results in ``RESULTS/claims/STUDY/``),
at the training sigma ``presets.STUDY_SIGMA`` (0.25) unless its name says otherwise; their sizes
are ``rddrs.studies.budgets``' ``budget`` records:

* ``tuning``: the step size of each (method, step rule) pair, soft objective, measured on
  validation images that no reported number uses (20..27 at the cpu preset). ``STEP_SIZES``
  holds the choice, the candidate with the largest proxy ACR there.
* ``variants``: objective (soft, clamped, capped) x step rule (sgd, adam) for DDRS, ANCER and
  RDDRS at those step sizes, on images 0..19; ANCER and RDDRS start from the preset's DDRS.
  Also RDDRS started from ANCER (C = diag(theta), floor sigma_x*): a superset of ANCER's
  ellipsoids, refined in the affine-invariant geometry. ``BEST`` holds each method's variant
  with the largest proxy ACR.
* ``step_sizes``: the paper's RDDRS step sizes 0.5, 1 and 25, with our step bound (soft
  objective) and without it (clamped objective, as in the authors' code).
* ``frontier``: each method's best variant at several search budgets (iterations x samples).
* ``diagonal``: RDDRS' best variant, and the same search from DDRS' start, each beside itself
  kept to diagonal C: what the off-diagonal entries add.
* ``best_sigmaS``: the best variants of the three methods at every training sigma, on the
  preset's images (100 at the cpu preset).
* ``clamped``: the authors' pipeline (``PIPELINE``): their clamp, their chaining and their
  code's step sizes, at the cpu preset and on the paper slice. At the paper preset it shares the
  folder of chapter 5's Figure 2 runs at sigma 0.25 (``rddrs.studies.headline``), with the
  pipeline taken apart (``pipeline_parts_study``).

Chapter 5 (``rddrs.studies.headline``) builds its Figure 2 and mechanism studies from this grid's
choices (``BEST``, ``PIPELINE``).

Measures: ``gradient_quality`` (relative error of the Monte Carlo gradient of H against a
reference from far more draws), ``diagonal_split`` (how much of that gradient, and of its
error, lies on the diagonal), ``evaluations`` (network passes per image of a variant),
``summary_rows`` (ACRs and certificates at the cap per variant).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.methods import SEARCHED
from rddrs.core.noise import FullSPD, Isotropic, NoiseSource
from rddrs.core.optimize import objective_and_gradient
from rddrs.core.presets import OBJECTIVES, STEPS, STUDY_SIGMA, preset as preset_record
from rddrs.core.stats import gap_cap
from rddrs.pipeline.results import model_path, read_rows, result_path
from rddrs.studies import budgets
from rddrs.studies.study import Study, Variant, VariantRun

#: step-size candidates per (method, step rule), as Search overrides, for the tuning study
CANDIDATES = {
    ("ddrs", "sgd"): ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}, {"lr": 3e-2}),
    ("ddrs", "adam"): ({"lr": 3e-3}, {"lr": 1e-2}, {"lr": 3e-2}, {"lr": 0.1}),
    ("ancer", "adam"): ({"lr": 0.04}, {"lr": 0.08}, {"lr": 0.2}, {"lr": 0.5}),
    ("ancer", "sgd"): (
        {"lr": 10.0, "max_step": 0.1},
        {"lr": 100.0, "max_step": 0.1},
        {"lr": 100.0, "max_step": 0.3},
        {"lr": 100.0, "max_step": 1.0},
    ),
    ("rddrs", "sgd"): ({"lr": 1.0}, {"lr": 1.0, "max_step": 0.3}, {"lr": 1.0, "max_step": 1.0}),
    ("rddrs", "adam"): ({"lr": 0.3, "max_step": 0}, {"lr": 1.0, "max_step": 0}, {"lr": 3.0, "max_step": 0}),
}

#: the chosen candidate of each pair (the tuning study's largest proxy ACR; the budget chapter checks it)
STEP_SIZES = {
    ("ddrs", "sgd"): {"lr": 1e-2},
    ("ddrs", "adam"): {"lr": 3e-2},
    ("ancer", "adam"): {"lr": 0.2},
    ("ancer", "sgd"): {"lr": 100.0, "max_step": 1.0},
    ("rddrs", "sgd"): {"lr": 1.0, "max_step": 0.3},
    ("rddrs", "adam"): {"lr": 1.0, "max_step": 0},
}

#: the RDDRS variants started from an ANCER variant of the grid: (objective, step, ANCER variant)
FROM_ANCER = (
    ("soft", "sgd", "ancer_soft_adam"),
    ("soft", "adam", "ancer_soft_adam"),
    ("capped", "adam", "ancer_soft_adam"),
    ("capped", "adam", "ancer_capped_adam"),
)

#: each method's best variant in the variants study (largest proxy ACR; the budget chapter checks it)
BEST = {"ddrs": "ddrs_capped_sgd", "ancer": "ancer_soft_adam", "rddrs": "rddrs_capped_adam_from_ancer_capped_adam"}


def _name(values: dict) -> str:
    return "_".join(
        f"{k.replace('_', '')}{v:g}"
        if isinstance(v, float | int) and not isinstance(v, bool)
        else f"{k.replace('_', '')}{v}"
        for k, v in values.items()
    )


def tuning_name(method: str, step: str, candidate: dict) -> str:
    """The tuning study's name of one candidate, e.g. ``rddrs_adam_lr1_maxstep0``."""
    return f"{method}_{step}_{_name(candidate)}"


def tuning_study(preset: str) -> Study:
    first, count = budgets.of(preset).budget.tuning
    variants = tuple(
        Variant(tuning_name(m, step, c), m, {"step": step, **c})
        for (m, step), candidates in CANDIDATES.items()
        for c in candidates
    )
    return Study("tuning", count, variants, first=first, digests=False)


def tuning_choice(runs: dict) -> dict:
    """Per (method, step rule), the candidate with the largest proxy ACR in the tuning runs."""

    def acr(name):
        return float(runs[name].certified("proxy").mean())

    return {pair: max(candidates, key=lambda c: acr(tuning_name(*pair, c))) for pair, candidates in CANDIDATES.items()}


def _variant(method: str, objective: str, step: str, start: str | None = None) -> Variant:
    name = f"{method}_{objective}_{step}" + (f"_from_{start}" if start else "")
    return Variant(name, method, {"step": step, "objective": objective, **STEP_SIZES[(method, step)]}, start=start)


def variants_study(preset: str) -> Study:
    grid = tuple(_variant(m, o, s) for m in SEARCHED for o in OBJECTIVES for s in STEPS)
    from_ancer = tuple(_variant("rddrs", o, s, start=a) for o, s, a in FROM_ANCER)
    return Study("variants", budgets.of(preset).budget.count, grid + from_ancer, digests=False)


def step_size_study(preset: str) -> Study:
    variants = []
    for lr in (0.5, 1.0, 25.0):
        variants.append(Variant(f"rddrs_lr{lr:g}_bounded", "rddrs", {"lr": lr}))
        variants.append(
            Variant(f"rddrs_lr{lr:g}_clamped_unbounded", "rddrs", {"lr": lr, "objective": "clamped", "max_step": 0})
        )
    return Study("step_sizes", budgets.of(preset).budget.count, tuple(variants), digests=False)


def _best_chain(method: str) -> list[Variant]:
    """The best variant of ``method`` and the variants it starts from, from the variants study."""
    study = variants_study("cpu")
    chain, name = [], BEST[method]
    while name is not None:
        variant = study.variant(name)
        chain.insert(0, variant)
        name = variant.start
    return chain


def frontier_study(preset: str) -> Study:
    variants = []
    for method, sizes in budgets.of(preset).budget.frontier.items():
        *starts, best = _best_chain(method)
        for iterations, samples in sizes:
            variants.append(
                Variant(
                    f"{method}_it{iterations}_m{samples}",
                    method,
                    {**best.search, "iterations": iterations, "samples": samples},
                    start=starts[-1].name if starts else None,
                )
            )
        variants.extend(v for v in starts if v not in variants)
    return Study("frontier", budgets.of(preset).budget.count, tuple(variants), digests=False)


def diagonal_study(preset: str) -> Study:
    """RDDRS' best variant, and the same search from DDRS' sigma_x* I, each beside itself kept
    to diagonal C (``Search.diagonal``; same start, same draws): what the off-diagonal freedom adds."""
    *starts, best = _best_chain("rddrs")
    searches = (best, Variant(best.name.split("_from_")[0], "rddrs", best.search))
    kept = tuple(
        Variant(f"{v.name}_diagonal", "rddrs", {**v.search, "diagonal": True}, start=v.start) for v in searches
    )
    return Study("diagonal", budgets.of(preset).budget.count, (*starts, *searches, *kept), digests=False)


def best_study(preset: str, sigma: float) -> Study:
    """The best variants of DDRS, ANCER and RDDRS (with what they start from) at ``sigma``."""
    variants = []
    for method in SEARCHED:
        for variant in _best_chain(method):
            if variant not in variants:
                variants.append(variant)
    return Study(f"best_sigma{sigma:.2f}", budgets.of(preset).budget.best_count, tuple(variants), digests=False)


#: RDDRS with the authors' clamp from the clamped DDRS, but with our step bound
_CLAMPED_BOUNDED = Variant("rddrs_clamped_bounded", "rddrs", {"objective": "clamped"}, start="ddrs_clamped")


#: the authors' pipeline: their clamp, and ANCER and RDDRS chained from the clamped DDRS, RDDRS
#: without our step bound (as in their code)
PIPELINE = (
    Variant("ddrs_clamped", "ddrs", {"objective": "clamped"}),
    Variant("ancer_clamped", "ancer", {"objective": "clamped"}, start="ddrs_clamped"),
    Variant("rddrs_clamped", "rddrs", {"objective": "clamped", "max_step": 0}, start="ddrs_clamped"),
)


def _pipeline_folder(preset: str) -> str:
    """The study folder of the authors' pipeline at sigma 0.25: the paper preset's Figure 2 one."""
    return f"figure2_sigma{STUDY_SIGMA:.2f}" if preset == "paper" else "clamped"


def clamped_study(preset: str) -> Study:
    """The preset's searches with the authors' clamp, chained as in their code (``PIPELINE``),
    and ANCER also at the step size their script runs (1, where the paper says 0.04 or 0.4).
    Below the paper's 20000 samples per step the unbounded RDDRS overflows, so there RDDRS
    also runs with our bound."""
    bounded = () if preset == "paper" else (_CLAMPED_BOUNDED,)
    ddrs, ancer, rddrs = PIPELINE
    return Study(
        _pipeline_folder(preset),
        budgets.of(preset).budget.count,
        digests=False,
        variants=(
            ddrs,
            ancer,
            Variant("ancer_clamped_lr1", "ancer", {"objective": "clamped", "lr": 1.0}, start="ddrs_clamped"),
            rddrs,
            *bounded,
        ),
    )


#: images of the paper slice on which the authors' pipeline is taken apart (``pipeline_parts_study``)
PARTS_COUNT = 2


def pipeline_parts_study(preset: str) -> Study:
    """At the paper preset, the authors' pipeline (``clamped_study``) with one part changed at a
    time, on the slice's first ``PARTS_COUNT`` images: RDDRS with our step bound, or with the soft
    objective instead of the clamp, both from the clamped DDRS. It shares the clamped study's
    folder, so the pipeline's own runs are read, not run again; the other presets have no parts."""
    if preset != "paper":
        return Study(_pipeline_folder(preset), PARTS_COUNT, (), digests=False)
    pipeline = clamped_study(preset)
    return Study(
        _pipeline_folder(preset),
        PARTS_COUNT,
        digests=False,
        variants=(
            pipeline.variant("ddrs_clamped"),
            pipeline.variant("rddrs_clamped"),
            _CLAMPED_BOUNDED,
            Variant("rddrs_soft_unbounded", "rddrs", {"max_step": 0}, start="ddrs_clamped"),
        ),
    )


# -- measures ------------------------------------------------------------------------------


def evaluations(study: Study, variant: Variant, preset: str) -> int:
    """Network passes per image of the variant's searches, its start's included (a pass is a
    forward and a backward of one noisy image; certification's n0 + n are not counted)."""
    search = {**preset_record(preset).search[variant.method].record(), **variant.search}
    own = search["iterations"] * (search["samples"] + (1 if search.get("control_variate") else 0))
    if variant.method == "ddrs":
        return own
    if variant.start is not None:
        return own + evaluations(study, study.variant(variant.start), preset)
    ddrs = preset_record(preset).search["ddrs"]
    return own + ddrs.iterations * ddrs.samples


def summary_rows(runs: dict, n: int, alpha: float) -> list[dict]:
    """Per variant: proxy and l2 ACR, mean gap, certificates whose gap is at the cap of n draws
    at level alpha, images whose search diverged, and seconds per image."""
    cap = gap_cap(n, alpha)
    rows = []
    for name, run in runs.items():
        res = run.results
        rows.append(
            {
                "variant": name,
                "method": run.variant.method,
                "images": res.n,
                "diverged": res.diverged,
                "proxy_acr": float(run.certified("proxy").mean()),
                "l2_acr": float(run.certified("l2").mean()),
                "at_cap": int((res.gap >= cap - 1e-9).sum()),
                "gap": float(res.gap.mean()),
                "seconds": float(res.seconds.mean()),
            }
        )
    return rows


def best_of(runs: dict[str, VariantRun], method: str, kind: str = "proxy") -> str:
    """The name of ``method``'s variant with the largest ACR of ``kind`` among ``runs``."""
    scored = {name: float(run.certified(kind).mean()) for name, run in runs.items() if run.variant.method == method}
    if not scored:
        raise RDDRSError(f"no {method} variant to choose from")
    return max(scored, key=scored.get)


def _gradient_estimate(
    model,
    x: torch.Tensor,
    law,
    index: int,
    m: int,
    repeat: int,
    kappa: float,
    seed: int,
    chunk: int,
    antithetic: bool = False,
    control_variate: bool = False,
) -> torch.Tensor:
    """The Monte Carlo gradient of H at ``law`` for one input from m draws of replicate ``repeat``
    of its optimisation stream (independent replicates for independent estimates)."""
    eps = NoiseSource(seed, NoiseSource.OPTIMIZE, x.device, repeat=repeat).draw(
        [index], m, law.dim, x.dtype, antithetic=antithetic
    )
    return objective_and_gradient(model, x, law, eps, kappa, control_variate=control_variate, chunk=chunk)[1]


def gradient_quality(
    model,
    x: torch.Tensor,
    sigma_star: torch.Tensor,
    indices,
    sizes,
    reference: int,
    repeats: int,
    kappa: float = 1e-6,
    seed: int = 0,
    chunk: int = 4000,
) -> list[dict]:
    """Relative error of the Monte Carlo gradient of RDDRS' H at ``C = sigma_x* I``, per image.

    ``||g_m - g_ref||_C / ||g_ref||_C`` in the affine-invariant norm at C, where ``g_ref`` is
    the estimate from ``reference`` draws and ``g_m`` one from m draws of each scheme: plain
    draws, m/2 antithetic pairs, and plain draws with the control variate. Every estimate uses
    its own stream (replicates of the optimisation stream, ``NoiseSource(repeat=...)``), so
    they are independent of each other and of the reference.
    """
    d = x[0].numel()
    rows = []
    for j, index in enumerate(indices):
        xi = x[j : j + 1]
        law = FullSPD.embed(Isotropic(sigma_star[j : j + 1].to(xi), d))

        def estimate(m: int, repeat: int, **options):
            return _gradient_estimate(model, xi, law, index, m, repeat, kappa, seed, chunk, **options)

        ref = estimate(reference, repeat=10_000)
        norm = float(law.inner(ref, ref).sqrt())
        for m in sizes:
            for scheme, options in (
                ("plain", {}),
                ("antithetic", {"antithetic": True}),
                ("control variate", {"control_variate": True}),
            ):
                errors = [
                    float(law.inner(g - ref, g - ref).sqrt()) / norm
                    for g in (estimate(m, repeat=1 + r, **options) for r in range(repeats))
                ]
                rows.append(
                    {
                        "image": int(index),
                        "samples": int(m),
                        "scheme": scheme,
                        "error": float(np.mean(errors)),
                        "errors": errors,
                    }
                )
    return rows


def samples_for(rows: list[dict], target: float, reference: int | None = None) -> dict[str, float]:
    """Per scheme, the draws m for a mean relative error of ``target``, from a fit
    ``error = c sqrt(1/m + 1/M)`` over every image and size (least squares in log space, slope
    fixed): the error of m independent draws against a reference of M = ``reference`` draws,
    whose own noise adds to it (``None``: an exact reference)."""
    inv_ref = 0.0 if reference is None else 1.0 / reference
    out = {}
    for scheme in sorted({r["scheme"] for r in rows}):
        own = [r for r in rows if r["scheme"] == scheme]
        log_c = np.mean([math.log(r["error"]) - 0.5 * math.log(1.0 / r["samples"] + inv_ref) for r in own])
        out[scheme] = float((math.exp(log_c) / target) ** 2)
    return out


def diagonal_split(
    model,
    x: torch.Tensor,
    sigma_star: torch.Tensor,
    indices,
    samples: int,
    repeats: int,
    kappa: float = 1e-6,
    seed: int = 0,
    chunk: int = 4000,
) -> list[dict]:
    """Per image, at ``C = sigma_x* I``, the share of the diagonal in the squared metric norm of
    the gradient g of RDDRS' H (``signal_share``) and in that of the Monte Carlo error of one
    estimate from ``samples`` draws (``noise_share``), and the error's size ``E||g_j - g||^2 / ||g||^2``.

    From K = ``repeats`` independent estimates g_j: the mean of ``<g_j, g_k>`` over pairs j != k
    is an unbiased estimate of ``||g||^2``, and the mean of ``||g_j||^2`` minus it one of
    ``E||g_j - g||^2``; the same on the diagonal parts. At ``C = sigma I`` the metric makes the
    diagonal and off-diagonal parts orthogonal, so the shares are those of ``tr(C^-1 U C^-1 U)``.
    """
    d = x[0].numel()
    rows = []
    for j, index in enumerate(indices):
        xi = x[j : j + 1]
        law = FullSPD.embed(Isotropic(sigma_star[j : j + 1].to(xi), d))
        full, diag = [], []
        for r in range(repeats):
            g = _gradient_estimate(model, xi, law, index, samples, 1 + r, kappa, seed, chunk)
            full.append(g)
            diag.append(spd.diagonal_part(g))

        def moments(parts):
            total = sum(parts)
            squares = sum(float(law.inner(p, p)) for p in parts)
            signal = (float(law.inner(total, total)) - squares) / (repeats * (repeats - 1))
            return signal, squares / repeats - signal

        (signal, noise), (signal_diag, noise_diag) = moments(full), moments(diag)
        rows.append(
            {
                "image": int(index),
                "samples": int(samples),
                "signal_share": signal_diag / signal,
                "noise_share": noise_diag / noise,
                "noise_to_signal": noise / signal,
            }
        )
    return rows


def _at_sigma_star(preset: str, results: str | Path, device: str, data: str | Path, models: str | Path):
    """The model, the preset's first ``gradient_images`` test images and their sigma_x* (its
    standard DDRS run), and RDDRS' kappa: where the gradient measures are taken."""
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.models import load_model, resolve_device

    images, _ = load_dataset(Path(data), train=False)
    count = budgets.of(preset).budget.gradient_images
    rows = read_rows(result_path(results, "ddrs", STUDY_SIGMA))
    missing = [i for i in range(count) if i not in rows]
    if missing:
        raise RDDRSError(f"the standard DDRS run in {results} lacks image {missing[0]}: run it first")
    star = torch.tensor([rows[i]["sigma_min"] for i in range(count)])
    model = load_model(model_path(STUDY_SIGMA, models), device=resolve_device(device))
    kappa = preset_record(preset).search["rddrs"].kappa
    return model, images[:count].to(device), star.to(device), list(range(count)), kappa


def gradient_study(
    preset: str,
    results: str | Path,
    *,
    device: str = "cpu",
    data: str | Path = "data",
    models: str | Path = "data/models",
    seed: int = 0,
) -> list[dict]:
    """``gradient_quality`` on the preset's first images, at sigma_x* of its standard DDRS run,
    cached in ``RESULTS/claims/gradients.json``."""
    from rddrs.pipeline.files import cached_json

    budget = budgets.of(preset).budget

    def compute():
        model, x, star, indices, kappa = _at_sigma_star(preset, results, device, data, models)
        return gradient_quality(
            model,
            x,
            star,
            indices,
            budget.gradient_sizes,
            budget.gradient_reference,
            budget.gradient_repeats,
            kappa=kappa,
            seed=seed,
        )

    return cached_json(Path(results) / "claims" / "gradients.json", compute)


def diagonal_split_study(
    preset: str,
    results: str | Path,
    *,
    device: str = "cpu",
    data: str | Path = "data",
    models: str | Path = "data/models",
    seed: int = 0,
) -> list[dict]:
    """``diagonal_split`` on the gradient study's images, at its largest sample count, with
    ``gradient_repeats`` estimates each, cached in ``RESULTS/claims/diagonal_split.json``."""
    from rddrs.pipeline.files import cached_json

    budget = budgets.of(preset).budget

    def compute():
        model, x, star, indices, kappa = _at_sigma_star(preset, results, device, data, models)
        return diagonal_split(
            model, x, star, indices, max(budget.gradient_sizes), budget.gradient_repeats, kappa=kappa, seed=seed
        )

    return cached_json(Path(results) / "claims" / "diagonal_split.json", compute)


# -- tables and figures ----------------------------------------------------------------------


def frontier_rows(runs: dict, study: Study, preset: str) -> list[dict]:
    """Per frontier variant: its method, network passes per image and both ACRs."""
    rows = []
    for name, run in runs.items():
        if not name.startswith(f"{run.variant.method}_it"):
            continue
        rows.append(
            {
                "variant": name,
                "method": run.variant.method,
                "evaluations": evaluations(study, run.variant, preset),
                "proxy_acr": float(run.certified("proxy").mean()),
                "l2_acr": float(run.certified("l2").mean()),
            }
        )
    return sorted(rows, key=lambda r: (SEARCHED.index(r["method"]), r["evaluations"]))


def frontier_figure(rows: list[dict]):
    """Proxy and l2 ACR against network passes per image (log axis), one line per method, in
    the book's style (``rddrs.studies.display``)."""
    from matplotlib.ticker import NullFormatter

    from rddrs.studies import display

    fig, axes = display.new_figure(1, 2, height=2.9)
    handles = {}
    for ax, kind, label in zip(axes, ("proxy_acr", "l2_acr"), ("proxy ACR", "ℓ2 ACR")):
        for method in SEARCHED:
            own = [r for r in rows if r["method"] == method]
            if own:
                (line,) = ax.plot(
                    [r["evaluations"] for r in own], [r[kind] for r in own], marker="o", **display.method_style(method)
                )
                handles.setdefault(method, line)
        ax.set(xscale="log", xlabel="network passes per image", ylabel=label)
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide
        ax.grid(True)
    fig.legend(
        list(handles.values()),
        [h.get_label() for h in handles.values()],
        loc="outside upper center",
        ncol=len(handles),
        frameon=False,
    )
    return fig


def gradient_rows(rows: list[dict]) -> list[dict]:
    """Mean relative error over images per (samples, scheme), with its spread over images."""
    out = []
    for m in sorted({r["samples"] for r in rows}):
        for scheme in ("plain", "antithetic", "control variate"):
            errors = [r["error"] for r in rows if r["samples"] == m and r["scheme"] == scheme]
            if errors:
                out.append(
                    {
                        "samples": m,
                        "scheme": scheme,
                        "error": float(np.mean(errors)),
                        "min": float(np.min(errors)),
                        "max": float(np.max(errors)),
                    }
                )
    return out


def best_figure(papers: dict, best: dict, kind: str = "proxy"):
    """The paper's Figure 2 layout (one panel per training sigma) with each searched method
    twice: its papers' search (thin, light) and its best variant (``BEST``, bold), both in the
    method's colour and dashes; RS as in the paper.

    ``papers``: ``{(sigma, method): analysis.Results}`` of the standard runs; ``best``:
    ``{sigma: {variant name: VariantRun}}`` of the best_sigmaS studies.
    """
    from rddrs.core.methods import NAMES
    from rddrs.studies import analysis, display

    sigmas = sorted({s for s, _ in papers} | set(best))
    fig, axes = display.new_figure(1, len(sigmas), height=2.9, sharey=True, squeeze=False)
    axes = axes[0]
    handles = {}
    for ax, sigma in zip(axes, sigmas):
        lines = [(m, papers[(sigma, m)], "papers'") for m in NAMES if (sigma, m) in papers]
        lines += [
            (run.variant.method, run.results, "best")
            for name, run in best.get(sigma, {}).items()
            if name == BEST.get(run.variant.method)
        ]
        top = max(float(analysis.certified_radius(res, kind).max(initial=0.0)) for _, res, _ in lines)
        for method, res, which in lines:
            x, y = analysis.certified_accuracy_curve(res, kind, r_max=1.05 * top)
            style = display.method_style(method)
            label = style.pop("label") + ("" if method == "rs" else f" ({which})")
            bold = which == "best"
            (line,) = ax.step(
                x, y, where="pre", linewidth=2.4 if bold else 1.2, alpha=1.0 if bold else 0.5, label=label, **style
            )
            handles.setdefault(label, line)
        ax.set(xlim=(0, 1.05 * top), ylim=(0, 1.0), title=f"σ = {sigma:g}")
        ax.set_xlabel("proxy radius" if kind == "proxy" else "ℓ2 radius")
        ax.grid(True)
    axes[0].set_ylabel("certified accuracy")
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncol=4, frameon=False)
    return fig
