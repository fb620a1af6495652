"""Chapter 5, the headline at the paper's own settings: the paper's Figure 2 as the rows in
``results/paper`` stand, and the laws behind it.

Studies (data for ``rddrs.studies.study.run_study``, built from chapter 7's grid choices,
``rddrs.studies.budget``):

* ``figure2_sigmaS`` (``figure2_study``): the paper's Figure 2 at training sigma S: RS, the
  authors' pipeline (``budget.PIPELINE``), the capped DDRS and, in a lower tier, ANCER's and
  RDDRS' best variants of the cpu grid at the paper's path length; at the paper preset on the
  whole test set, computed chunk by chunk (``FIGURE2_SIGMAS``: the order a sweep takes), on
  CPUs and GPUs (each file's sidecar says which session wrote which rows).
* ``mechanism`` (``mechanism_study``): the laws behind the headline, kept with their traces on
  the first test images; ``measures``, ``refutations`` and ``memories`` run the measures of
  ``rddrs.studies.mechanism`` over them and cache their rows in ``RESULTS/claims/mechanism/``.

The certificates as guarantees at every sigma: ``tested_runs`` are the mechanism study's runs at
``STUDY_SIGMA`` and, at Figure 2's other sigmas, the paired runs on their first
``refutation_images`` images; ``refutations`` and ``memories`` take a ``sigma`` and keep their
files in ``tested_dir`` (the panel's folder there), ``constancies`` measures the classifier of
those panels' laws at more other images, and ``guarantees`` reads what all of them stored, per
sigma and run.

Reading Figure 2: ``read`` takes, at one training sigma, every variant's rows on the images that
all the compared variants have, so that every comparison is paired image by image; ``panels``
does so at every sigma that has rows; ``coverage`` says which images a panel holds; ``writers``
and ``pace`` say who wrote the rows and how fast; ``band`` is a bootstrap band over images around
a certified-accuracy curve; ``device_check`` computes again here a certificate another device
computed (an isotropic law at the row's sigma, independent draws): both lower bounds must agree
within their Monte Carlo error.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rddrs import RDDRSError
from rddrs.core.methods import method as method_record
from rddrs.core.noise import family_class
from rddrs.core.presets import OTHER_SIGMAS, STUDY_SIGMA, preset as preset_record
from rddrs.pipeline.provenance import index_ranges, provenance_parts, row_writers
from rddrs.pipeline.results import model_path, read_rows, read_sidecar, traces_dir
from rddrs.pipeline.runs import load_smoothing
from rddrs.studies import analysis, budgets
from rddrs.studies.budget import BEST, PIPELINE, _best_chain, variants_study
from rddrs.studies.mechanism import measure, refutation, survival
from rddrs.studies.study import Study, Variant, VariantRun, run_study, study_dir, study_specs

#: the paper's Figure 2 at its own settings: the training sigmas, in the order a sweep computes them
FIGURE2_SIGMAS = (STUDY_SIGMA, *OTHER_SIGMAS)


def figure2_name(sigma: float) -> str:
    return f"figure2_sigma{sigma:.2f}"


def scaled_to(preset: str, variant: Variant) -> Variant:
    """A variant of the cpu preset's grid at ``preset``: the same search with its step size scaled
    so that iterations x step size (the path length) stays the cpu preset's."""
    cpu, there = preset_record("cpu").search[variant.method], preset_record(preset).search[variant.method]
    ratio = cpu.iterations / there.iterations
    return Variant(
        variant.name,
        variant.method,
        {**variant.search, "lr": variant.search["lr"] * ratio},
        start=variant.start,
        tier=variant.tier,
    )


def _capped_ddrs(preset: str) -> Variant:
    """DDRS' best variant of the cpu preset's grid (capped, plain ascent) at ``preset``'s path length."""
    best = scaled_to(preset, variants_study("cpu").variant(BEST["ddrs"]))
    return Variant("ddrs_capped", "ddrs", best.search)


def mechanism_study(preset: str) -> Study:
    """The laws behind the headline, kept with their traces on the preset's first
    ``mechanism_count`` test images: RS, the authors' pipeline (``PIPELINE``) with ANCER also at
    their script's step size, the capped DDRS, and RDDRS' best variant with the ANCER run it
    starts from (``rddrs.studies.mechanism`` measures them)."""
    best = [scaled_to(preset, v) for v in _best_chain("rddrs") if v.method != "ddrs"]
    ddrs, ancer, rddrs = PIPELINE
    lr1 = Variant("ancer_clamped_lr1", "ancer", {"objective": "clamped", "lr": 1.0}, start="ddrs_clamped")
    return Study(
        "mechanism",
        budgets.of(preset).headline.mechanism_count,
        digests=False,
        variants=(Variant("rs", "rs"), ddrs, ancer, lr1, rddrs, _capped_ddrs(preset), *best),
    )


#: ANCER in the authors' pipeline at the paper's other step size: it ran 0.04 and 0.4, the pipeline
#: (``PIPELINE``) runs 0.04 and the authors' script 1
OTHER_STEP = Variant("ancer_clamped_lr0.4", "ancer", {"objective": "clamped", "lr": 0.4}, start="ddrs_clamped")


def figure2_study(preset: str, sigma: float) -> Study:
    """The paper's Figure 2 at ``sigma`` on the paper preset's whole test set (another preset's
    headline images elsewhere, for the chapter's smaller runs): RS, the authors' pipeline
    (``PIPELINE``), the capped DDRS at the cpu preset's tuned path length (lr 1e-3 over 1500
    steps) and ANCER at the paper's other step size (``OTHER_STEP``), then, in tier 1, each
    method's best variant of the cpu preset's grid (chosen there), its step size scaled to the
    same path length."""
    capped = _capped_ddrs(preset)
    best = []
    for method in ("ancer", "rddrs"):
        for variant in _best_chain(method):
            if variant.method != "ddrs" and variant.name not in {v.name for v in best}:
                best.append(replace(scaled_to(preset, variant), tier=1))
    count = preset_record(preset).count if preset == "paper" else budgets.of(preset).budget.count
    return Study(
        figure2_name(sigma), count, digests=False, variants=(Variant("rs", "rs"), *PIPELINE, capped, OTHER_STEP, *best)
    )


# -- reading Figure 2 ------------------------------------------------------------------------

#: the variants every paired comparison needs (RS, the authors' pipeline, the capped DDRS, ANCER at
#: the paper's other step size)
PAIRED = ("rs", "ddrs_clamped", "ancer_clamped", "rddrs_clamped", "ddrs_capped", OTHER_STEP.name)


def read(
    results, sigma: float, *, preset: str = "paper", names=PAIRED, data="data", models="data/models"
) -> dict[str, analysis.Results]:
    """Each variant's rows at ``sigma`` on the images all of ``names`` have, ordered by idx."""
    study = figure2_study(preset, sigma)
    specs = study_specs(study, sigma, preset, results, data=data, models=models)
    found = {name: analysis.read_results(specs[name].out) for name in names if Path(specs[name].out).exists()}
    if len(found) < len(names):
        raise RDDRSError(f"{results} has no rows of {', '.join(sorted(set(names) - set(found)))} at sigma {sigma:g}")
    common = sorted(set.intersection(*(set(res.idx.tolist()) for res in found.values())))
    return {name: res.subset(np.flatnonzero(np.isin(res.idx, common))) for name, res in found.items()}


def panels(
    results, *, preset: str = "paper", sigmas=FIGURE2_SIGMAS, names=PAIRED, data="data", models="data/models"
) -> dict[float, dict[str, analysis.Results]]:
    """``read`` at each of ``sigmas`` (ascending) whose variants all have rows on common images."""
    out = {}
    for sigma in sorted(sigmas):
        try:
            runs = read(results, sigma, preset=preset, names=names, data=data, models=models)
        except RDDRSError:
            continue
        if runs[names[0]].n:
            out[sigma] = runs
    return out


def coverage(idx) -> str:
    """Test indices in words: ``0-90 and 335-360``."""
    parts = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in index_ranges(idx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def writers(path) -> dict[tuple[str, str], int]:
    """Rows of a result file per (device, commit) of the session that wrote them."""
    rows = read_rows(path)
    counts: dict[tuple[str, str], int] = {}
    for part in row_writers(read_sidecar(path), rows).values():
        key = (str(part.get("device", "?")), str(part.get("git_commit") or "?")[:7])
        counts[key] = counts.get(key, 0) + 1
    return counts


def pace(path) -> dict[str, float]:
    """Mean seconds per image of a result file's rows, per kind of device that wrote them."""
    rows = read_rows(path)
    by: dict[str, list[float]] = {}
    for i, part in row_writers(read_sidecar(path), rows).items():
        kind = str(part.get("device", "?")).split(" ")[0].split(":")[0]
        by.setdefault(kind, []).append(rows[i]["seconds"])
    return {kind: float(np.mean(v)) for kind, v in by.items()}


def band(
    res: analysis.Results, kind: str, radii, draws: int = 2000, level: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` bootstrap band of the certified accuracy at ``radii``: its quantiles over
    ``draws`` resamples of the images with replacement."""
    radius = analysis.certified_radius(res, kind)
    ok = res.correct == 1
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, res.n, size=(draws, res.n))
    r = np.asarray(radii, dtype=np.float64)
    curves = ((radius[picks][:, :, None] >= r[None, None, :]) & ok[picks][:, :, None]).mean(1)
    tail = (1 - level) / 2
    return np.quantile(curves, tail, axis=0), np.quantile(curves, 1 - tail, axis=0)


def curves_figure(
    panels: dict[float, dict[str, analysis.Results]],
    labels: dict[str, str],
    styles: dict[str, dict],
    kinds=("proxy", "l2"),
    draws: int = 2000,
):
    """Figure 2: one row of panels per training sigma, certified accuracy against the proxy and
    the l2 radius, one line per variant with its 90 % bootstrap band over the row's images."""
    from rddrs.studies import display

    with display.style_context():
        fig, axes = display.new_figure(len(panels), len(kinds), height=2.6 * len(panels) + 0.6, squeeze=False)
        handles = {}
        for row, (sigma, runs) in zip(axes, panels.items()):
            for ax, kind in zip(row, kinds):
                top = max(float(analysis.certified_radius(res, kind).max(initial=0.0)) for res in runs.values())
                grid = np.linspace(0.0, 1.05 * top, 300)
                for name, res in runs.items():
                    x, y = analysis.certified_accuracy_curve(res, kind, r_max=1.05 * top)
                    style = styles[name]
                    (line,) = ax.step(
                        x,
                        y,
                        where="pre",
                        linewidth=1.8,
                        color=style["color"],
                        linestyle=style["linestyle"],
                        label=labels[name],
                    )
                    lo, hi = band(res, kind, grid, draws)
                    ax.fill_between(grid, lo, hi, step="pre", color=style["color"], alpha=0.15, linewidth=0)
                    handles.setdefault(name, line)
                ax.set(xlim=(0, 1.05 * top), ylim=(0, 1.0), xlabel=analysis.AXIS_LABELS[kind])
                ax.set_title(f"$\\sigma = {sigma:g}$, {runs[next(iter(runs))].n} images", fontsize="medium")
                ax.grid(True)
            row[0].set_ylabel("certified accuracy")
        fig.legend(
            list(handles.values()),
            [labels[n] for n in handles],
            loc="outside upper center",
            ncol=min(3, len(handles)),
            frameon=False,
        )
    return fig


def device_check(
    path,
    indices,
    *,
    n: int = 100_000,
    alpha: float = 0.001,
    seed: int = 0,
    data="data",
    models="data/models",
    device: str = "cpu",
) -> dict:
    """For rows of the isotropic run ``path`` (RS or DDRS) written on another device: CERTIFY
    again here with the row's sigma, fresh draws (another seed's streams), and both lower bounds
    on p_A side by side with the standard error of their difference; with this machine's
    provenance (``rddrs.pipeline.provenance.recorded``)."""
    from rddrs.core.certify import certify
    from rddrs.core.noise import Isotropic
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.models import load_model, resolve_device
    from rddrs.pipeline.provenance import recorded

    rows = read_rows(path)
    meta = read_sidecar(path)
    settings = meta["settings"]
    images, _ = load_dataset(Path(data), train=False)
    model = load_model(Path(models) / Path(meta["model"]).name, device=resolve_device(device))
    indices = [int(i) for i in indices]
    sigma = torch.tensor([rows[i]["sigma_min"] for i in indices])
    x = images[indices].to(device)
    cert = certify(model, x, Isotropic(sigma.to(device), x[0].numel()), indices, settings["n0"], n, alpha, seed + 1)
    out = []
    for j, i in enumerate(indices):
        there, here = rows[i]["p_lower"], float(cert.p_lower[j])
        spread = math.sqrt(2 * max(there * (1 - there), 1.0 / n) / n)
        out.append(
            {
                "idx": i,
                "sigma": float(sigma[j]),
                "p_lower_there": there,
                "p_lower_here": here,
                "predict_there": rows[i]["predict"],
                "predict_here": int(cert.predict[j]),
                "difference": here - there,
                "standard_error": spread,
            }
        )
    return recorded(device, out)


# -- the mechanism study --------------------------------------------------------------------


def tested_study(preset: str, sigma: float = STUDY_SIGMA) -> Study:
    """The study whose certificates are tested as guarantees at training ``sigma``: the mechanism
    study at ``STUDY_SIGMA``, Figure 2's at its other sigmas."""
    return mechanism_study(preset) if sigma == STUDY_SIGMA else figure2_study(preset, sigma)


def tested_names(preset: str, sigma: float = STUDY_SIGMA) -> tuple[str, ...]:
    """The runs of ``tested_study`` that are tested: all its variants at ``STUDY_SIGMA``, the paired
    runs (``PAIRED``) at the others."""
    return tuple(v.name for v in tested_study(preset, sigma).variants) if sigma == STUDY_SIGMA else PAIRED


def tested_runs(
    preset: str, results, sigma: float = STUDY_SIGMA, *, data="data", models="data/models"
) -> tuple[Study, dict[str, VariantRun]]:
    """The runs whose certificates are tested as guarantees at training ``sigma``: the mechanism
    study's at ``STUDY_SIGMA``; at Figure 2's other sigmas its paired runs (``PAIRED``) on the
    first ``refutation_images`` test images they share (a one-line error while they share fewer)."""
    study = tested_study(preset, sigma)
    if sigma == STUDY_SIGMA:
        return study, run_study(study, sigma, preset, results, data=data, models=models, compute=False)
    specs = study_specs(study, sigma, preset, results, data=data, models=models)
    found = read(results, sigma, preset=preset, data=data, models=models)
    wanted = budgets.of(preset).headline.refutation_images
    first = found[PAIRED[0]].idx[:wanted]
    if len(first) < wanted:
        raise RDDRSError(
            f"sigma {sigma:g} has rows of every paired run for {len(first)} test images, the attack takes the first "
            f"{wanted}: let the fill (`rddrs fill`) certify more"
        )
    return study, {
        name: VariantRun(
            study.variant(name), Path(specs[name].out), res.subset(np.flatnonzero(np.isin(res.idx, first))), {}
        )
        for name, res in found.items()
    }


def tested_dir(preset: str, results, sigma: float = STUDY_SIGMA) -> Path:
    """Where the refutations and memory passes of ``tested_runs`` at ``sigma`` are kept."""
    return study_dir(results, tested_study(preset, sigma))


def _setup(preset: str, results, device: str, data, models, sigma: float = STUDY_SIGMA):
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.models import load_model, resolve_device

    study, runs = tested_runs(preset, results, sigma, data=data, models=models)
    images, labels = load_dataset(Path(data), train=False)
    model_file = model_path(sigma, models)
    return study, runs, images, labels, load_model(model_file, device=resolve_device(device)), model_file


def measures(
    preset: str, results, *, device: str = "cpu", data="data", models="data/models", seed: int = 0
) -> list[dict]:
    """``measure`` over the runs of ``mechanism_study`` (complete, with their traces:
    compute them first, e.g. with ``rddrs sweep --groups mechanism``), cached in
    ``RESULTS/claims/mechanism/measures.json``."""
    from rddrs.pipeline.files import cached_json
    from rddrs.pipeline.provenance import recorded

    def compute():
        _, runs, images, labels, model, _ = _setup(preset, results, device, data, models)
        votes = budgets.of(preset).headline.mechanism_votes
        return recorded(device, measure(runs, images, labels, model, samples=votes, seed=seed, device=device))

    path = Path(results) / "claims" / "mechanism" / "measures.json"
    return _checked(path, cached_json(path, compute, {"rows": list})["rows"], ("variant", "idx"))


def constancies(
    preset: str, results, sigma: float, *, device: str = "cpu", data="data", models="data/models", seed: int = 0
) -> list[dict]:
    """``constancy`` of the laws of ANCER and RDDRS (the authors' pipeline) on the images of
    ``tested_runs`` at one of Figure 2's other sigmas, at ``pool_per_class`` pool images of each
    class (``mechanism.pool``), cached in ``tested_dir``'s ``constancy.json``."""
    from rddrs.pipeline.files import cached_json
    from rddrs.pipeline.provenance import recorded
    from rddrs.studies.mechanism import constancy, pool

    if sigma == STUDY_SIGMA:
        raise RDDRSError(f"at sigma {sigma:g} the mechanism study's measures hold the constancy (rddrs mechanism)")
    budget = budgets.of(preset).headline

    def compute():
        _, runs, images, labels, model, _ = _setup(preset, results, device, data, models, sigma)
        chosen = pool(labels, per_class=budget.pool_per_class)
        others, other_labels = images[chosen].to(device), labels[chosen].numpy()
        rows = []
        for name in ("ancer_clamped", "rddrs_clamped"):
            run = runs[name]
            for idx in run.results.idx.tolist():
                x, label = images[idx : idx + 1].to(device), int(labels[idx])
                law = load_smoothing(run.path, [idx], x[0].numel(), torch.float32).to(device)
                measured = constancy(model, x, label, law, others, other_labels, budget.mechanism_votes, seed, idx)
                rows.append({"variant": name, "idx": idx, "label": label, "constancy": measured})
        return recorded(device, rows)

    path = tested_dir(preset, results, sigma) / "constancy.json"
    return _checked(path, cached_json(path, compute, {"rows": list})["rows"], ("variant", "idx", "constancy"))


def _checked(path: Path, rows, keys: tuple[str, ...]) -> list[dict]:
    """``rows``, read from ``path``, if each is an object with ``keys``; a one-line error otherwise."""
    if not (isinstance(rows, list) and all(isinstance(r, dict) and all(k in r for k in keys) for r in rows)):
        raise RDDRSError(
            f"{path} holds rows that are not objects with {', '.join(keys)}; move it away to compute it again"
        )
    return rows


#: the variants whose certificates are tested as guarantees about their pipeline, in this order
REFUTED = ("rddrs_clamped", "ancer_clamped", "ddrs_clamped", "ddrs_capped")


def _stored_refutations(path: Path) -> dict:
    from rddrs.pipeline.files import read_json

    stored = read_json(path, {"variants": dict}) if path.exists() else {"variants": {}}
    for entry in stored["variants"].values():
        _checked(path, entry.get("rows") if isinstance(entry, dict) else None, ("idx", "refuted"))
    return stored


def refutations(
    preset: str,
    results,
    *,
    sigma: float = STUDY_SIGMA,
    device: str = "cpu",
    data="data",
    models="data/models",
    seed: int = 0,
    compute: bool = True,
) -> list[dict]:
    """``refutation`` of every certificate (correct, radius > 0) of the variants ``REFUTED`` among
    the runs ``tested_runs`` at ``sigma``, the attack at the clamped DDRS' sigma_x*; kept in
    ``tested_dir``'s ``refutations.json`` variant by variant, so that a stopped computation keeps
    the variants it finished and the next call does the others (``compute``: False, only read
    those). Where a run's laws are not here (``laws_kept``) the law held fixed is not tested."""
    from rddrs.pipeline.files import write_atomic
    from rddrs.pipeline.provenance import recorded

    budget = budgets.of(preset).headline
    path = tested_dir(preset, results, sigma) / "refutations.json"
    stored = _stored_refutations(path)
    study = None
    for name in REFUTED:
        if name in stored["variants"] or not compute:
            continue
        if study is None:
            study, runs, images, labels, model, model_file = _setup(preset, results, device, data, models, sigma)
            start = runs["ddrs_clamped"].results
            star = dict(zip(start.idx.tolist(), start.sigma_min.tolist()))
        res = runs[name].results
        keep = np.flatnonzero((res.correct == 1) & (res.radius > 0))
        idx = res.idx[keep].tolist()
        rows = []
        if idx:
            # a GPU session's run may have landed without its traces: then no fixed-law check
            here = laws_kept(runs[name].path)
            laws = load_smoothing(runs[name].path, idx, images[0].numel(), torch.float32).to(device) if here else None
            rows = refutation(
                model,
                images[idx].to(device),
                labels[idx].numpy(),
                idx,
                np.array([star[i] for i in idx]),
                res.radius[keep],
                laws,
                study,
                study.variant(name),
                sigma,
                preset,
                model_file,
                seed=seed,
                steps=budget.refutation_steps,
                samples=budget.refutation_samples,
                check=budget.mechanism_votes * 5,
            )
        stored["variants"][name] = recorded(device, rows)
        write_atomic(path, [json.dumps(stored, indent=2).encode()])
    return [row for entry in stored["variants"].values() for row in entry["rows"]]


def guarantees(preset: str, results) -> dict[float, dict[str, dict]]:
    """What the stored attacks and memory passes say at each sigma (ascending) that has
    refutations, per variant of ``REFUTED`` attacked: ``tested``, ``refuted``, ``abstained``,
    ``radius`` (the mean l2 radius tested), ``boxed`` (every point kept in ``BOX``), ``held``
    (how often the law held fixed gave x's class; None where the laws were not here), and
    ``in_memory``: at how many refuting points the memory answers x's class (None where no memory
    pass saw the points: the laws it passed over were not the attacked runs'); where an earlier
    attack without the box is kept (``refutations_unboxed.json``), ``unboxed``: its refuted count
    over the same images."""
    from rddrs.pipeline.files import read_json

    out = {}
    for sigma in sorted(FIGURE2_SIGMAS):
        folder = tested_dir(preset, results, sigma)
        if not (folder / "refutations.json").exists():
            continue
        stored = _stored_refutations(folder / "refutations.json")["variants"]
        memory = (
            read_json(folder / "memory.json", {"variants": dict})["variants"]
            if (folder / "memory.json").exists()
            else {}
        )
        before = folder / "refutations_unboxed.json"
        unboxed = _stored_refutations(before)["variants"] if before.exists() else {}
        counts = {}
        for name in (n for n in REFUTED if n in stored):
            rows = stored[name]["rows"]
            refuting = [r for r in rows if r["refuted"]]
            seen = {a["idx"]: a for a in memory.get(name, {}).get("attacked", [])}
            fixed = [r["fixed_law_share"] for r in rows]
            counts[name] = {
                "tested": len(rows),
                "refuted": len(refuting),
                "abstained": sum(r["abstain"] for r in rows),
                "radius": float(np.mean([r["radius"] for r in rows])) if rows else math.nan,
                "boxed": all("box" in r for r in rows),
                "held": None if None in fixed else sum(f > 0.5 for f in fixed),
                "in_memory": sum(seen[r["idx"]]["answer"] == seen[r["idx"]]["label"] for r in refuting)
                if name in memory and all(r["idx"] in seen for r in rows)
                else None,
            }
            if name in unboxed:
                same = {r["idx"] for r in rows}
                counts[name]["unboxed"] = sum(r["refuted"] for r in unboxed[name]["rows"] if r["idx"] in same)
        out[sigma] = counts
    return out


# -- what survives the memory --------------------------------------------------------------


def laws_kept(path) -> bool:
    """Whether the laws a run certified with are here: in its rows (RS, DDRS) or in its traces."""
    return (
        family_class(method_record(read_sidecar(path)["settings"]["method"]).family).in_rows
        or traces_dir(Path(path)).is_dir()
    )


def check_laws_from(laws_from) -> None:
    """A one-line error unless ``laws_from`` is None or a folder holding result files with sidecars."""
    if laws_from is not None and not any(Path(laws_from).glob("*.tsv.json")):
        raise RDDRSError(
            f"--laws-from {laws_from}: "
            + ("no result files (NAME.tsv with its sidecar) there" if Path(laws_from).is_dir() else "no such directory")
        )


def memories(
    preset: str,
    results,
    *,
    sigma: float = STUDY_SIGMA,
    data="data",
    models="data/models",
    laws_from=None,
    progress: bool = False,
    refresh: bool = False,
) -> dict:
    """``survival`` of each run of ``tested_runs`` at ``sigma`` whose laws are here (the rows of an
    isotropic run, the traces of the others), over all its rows, with the attacked points of
    ``refutations`` that record theirs; cached in ``tested_dir``'s ``memory.json`` (``refresh``:
    computed again for the runs whose laws are here, as rows are added; the others keep their
    stored entry). ``laws_from``: a folder of reruns with their traces (``NAME.tsv``: the same
    settings, on the study's images, run on another machine) that stand in for runs whose own
    traces were not kept; each entry names the file it read, whether it is such a rerun, and the
    machines that wrote its rows."""
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.files import read_json, write_atomic
    from rddrs.pipeline.settings import normalised

    results = Path(results)
    check_laws_from(laws_from)
    folder = tested_dir(preset, results, sigma)
    path = folder / "memory.json"

    def usable(path: Path, own: Path) -> bool:
        if not path.exists() or not set(read_rows(own)) <= set(read_rows(path)):
            return False
        if normalised(read_sidecar(path)["settings"]) != normalised(read_sidecar(own)["settings"]):
            raise RDDRSError(f"{path} was run with other settings than {own}")
        return laws_kept(path)

    def compute(entries: dict) -> dict:
        from rddrs.studies.mechanism import decode_point

        images, labels = load_dataset(Path(data), train=False)
        specs = study_specs(tested_study(preset, sigma), sigma, preset, results, data=data, models=models)
        attacked = _stored_refutations(folder / "refutations.json")["variants"]
        for name in tested_names(preset, sigma):
            own = Path(specs[name].out)
            candidates = (own, Path(laws_from) / own.name) if laws_from else (own,)
            found = next((p for p in candidates if usable(p, own)), None)
            if found:
                source = found.resolve()
                devices = {part["device"] for part in provenance_parts(read_sidecar(found)) if "device" in part}
                rows = attacked.get(name, {}).get("rows", []) if found == own else []
                points = {r["idx"]: decode_point(r["point"]) for r in rows if "point" in r}
                entries[name] = {
                    "source": str(
                        source.relative_to(results.resolve()) if source.is_relative_to(results.resolve()) else source
                    ),
                    "rerun": found != own,
                    "devices": sorted(devices),
                    **survival(found, images, labels, progress, points),
                }
        return {"order": "ascending idx", "variants": entries}

    if path.exists() and not refresh:
        value = read_json(path, {"variants": dict})
    else:
        value = compute(read_json(path, {"variants": dict})["variants"] if path.exists() else {})
        write_atomic(path, [json.dumps(value, indent=2).encode()])
    variants = value["variants"]
    if not all(isinstance(entry, dict) for entry in variants.values()):
        raise RDDRSError(f"{path} holds variants that are not objects; move it away to compute it again")
    return variants
