"""Chapter 8, the paper's other claims, as studies: variants of the MNIST runs and their summaries.

Each study is data for the driver ``rddrs.studies.study`` (``RESULTS/claims/STUDY/VARIANT.tsv``),
at the training sigma ``presets.STUDY_SIGMA``, sized by ``rddrs.studies.budgets``' ``claims`` records:
``rotation``, ``kappa``, ``floor``, ``samples``, ``isotropy`` (``studies``). The runtime summary
reads the standard runs' timings and measures one RDDRS iteration (``iteration_cost``, which the
benchmark's section 2 runs too).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from rddrs import RDDRSError
from rddrs.core import presets, spd
from rddrs.core.methods import NAMES as METHODS, method as method_record
from rddrs.core.noise import FullSPD, Isotropic
from rddrs.core.optimize import objective_and_gradient
from rddrs.pipeline.results import result_path
from rddrs.studies import analysis, budgets, display
from rddrs.studies.labels import label
from rddrs.studies.study import Study, Variant, VariantRun, paired_difference

#: seed of the random orthogonal matrix of the rotation study
ROTATE = 1


def studies(preset: str, count: int | None = None, rotate: int = ROTATE) -> dict[str, Study]:
    """The five computed studies at ``preset``'s budget (``count`` overrides its image count)."""
    budget = budgets.of(preset).claims
    count = budget.count if count is None else int(count)
    if count < 1:
        raise RDDRSError(f"count must be >= 1, got {count}")
    rddrs = presets.PRESETS[preset].search["rddrs"]
    draws = {False: "plain", True: "antithetic"}
    return {
        study.name: study
        for study in (
            Study(
                "rotation",
                count,
                tuple(Variant(m, m) for m in METHODS)
                + tuple(Variant(f"{m}_rotated", m, rotate=rotate) for m in METHODS),
            ),
            Study("kappa", count, tuple(Variant(f"kappa_{k:g}", "rddrs", {"kappa": k}) for k in budget.kappas)),
            Study("floor", count, (Variant("floor", "rddrs"), Variant("no_floor", "rddrs", {"floor": False}))),
            Study(
                "samples",
                min(count, budget.sample_inputs),
                tuple(
                    Variant(f"m{m}_{draws[a]}_r{r}", "rddrs", {"samples": m, "antithetic": a, "repeat": r})
                    for m in budget.sample_sizes
                    for a in draws
                    for r in range(budget.repeats)
                ),
            ),
            Study(
                "isotropy",
                count,
                (
                    Variant("rddrs", "rddrs"),
                    Variant("ancer", "ancer"),
                    Variant("ancer_equal_budget", "ancer", {"iterations": rddrs.iterations, "samples": rddrs.samples}),
                ),
            ),
        )
    }


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
        raise RDDRSError(
            f"isotropy_split needs positive eigenvalues (B, d) or SPD matrices (B, d, d), "
            f"got shape {tuple(scales.shape)}"
        )
    log_w = w.log().numpy()
    centre = log_w.mean(-1)
    log_start = np.log(np.broadcast_to(np.asarray(start, dtype=np.float64), centre.shape))
    anisotropic = np.sqrt(((log_w - centre[:, None]) ** 2).sum(-1))
    total = np.sqrt(((log_w - log_start[:, None]) ** 2).sum(-1))
    isotropic = math.sqrt(log_w.shape[-1]) * np.abs(centre - log_start)
    relative = np.divide(anisotropic, total, out=np.zeros_like(total), where=total > 0)
    return {"anisotropic": anisotropic, "isotropic": isotropic, "total": total, "relative": relative}


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
        rows.append(
            {
                "samples": samples,
                "antithetic": antithetic,
                "repeats": len(members),
                "images": proxy.shape[1],
                "proxy_mean": float(proxy.mean()),
                "proxy_std": float(proxy.std(0, ddof=1).mean()) if len(members) > 1 else math.nan,
                "proxy_iqr": float((q3 - q1).mean()),
                "objective_std": float(final.std(0, ddof=1).mean()) if len(members) > 1 else math.nan,
                "seconds": float(np.mean([r.results.seconds.mean() for r in members])),
            }
        )
    return rows


def isotropy_table(runs: dict[str, VariantRun]) -> list[dict]:
    """Per variant: medians over images of the isotropy split from sigma_x* I, and the ACRs."""
    rows = []
    for name, run in runs.items():
        split = isotropy_split(run.spectrum.astype(np.float64), run.sigma_star)
        rows.append(
            {
                "variant": name,
                "n": run.results.n,
                **{k: float(np.median(v)) for k, v in split.items()},
                "proxy_acr": float(run.certified("proxy").mean()),
                "l2_acr": float(run.certified("l2").mean()),
            }
        )
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


def iteration_cost(
    model,
    x: torch.Tensor,
    sigma_star: float,
    samples: int,
    kappa: float = 1e-6,
    max_step: float | None = None,
    repeat: int = 3,
    seed: int = 0,
) -> dict[str, float]:
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
    noisy = (
        Isotropic(torch.full((b,), sigma_star, dtype=x.dtype, device=x.device), d)
        .scale_noise(eps, x.reshape(b, 1, d))
        .reshape(b * samples, *x.shape[1:])
    )

    def iteration():
        _, grad = objective_and_gradient(model, x, law, eps, kappa)
        return law.step(grad, max_step).floor(sigma_star).eig  # and the next iteration's eigendecomposition

    def network():
        leaf = noisy.detach().requires_grad_(True)
        torch.autograd.grad(torch.log_softmax(model(leaf), -1)[:, 0].sum(), leaf)

    matrix = law.param[0]
    total, net = _best_time(iteration, repeat), _best_time(network, repeat)
    return {
        "total": total / b,
        "network": net / b,
        "rest": (total - net) / b,
        "eigh": _best_time(lambda: torch.linalg.eigh(matrix), repeat),
        "threads": torch.get_num_threads(),
    }


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
                ax.step(
                    x,
                    y,
                    where="pre",
                    label=label(run.variant),
                    linewidth=1.8,
                    color=styles[name]["color"],
                    linestyle=styles[name]["linestyle"],
                )
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
            right.plot(
                run.results.idx,
                run.spectrum[:, 0] / run.sigma_star,
                styles[name]["marker"],
                color=color,
                label=label(run.variant),
            )
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
            ax.plot(
                np.full(run.results.n, s["samples"] * offsets[s["antithetic"]]),
                run.certified("proxy"),
                style["marker"],
                color=style["color"],
                alpha=0.8,
                label=label,
            )
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
        splits = {name: isotropy_split(run.spectrum.astype(np.float64), run.sigma_star) for name, run in runs.items()}
        for name, split in splits.items():
            ax.plot(
                split["total"],
                split["anisotropic"],
                styles[name]["marker"],
                color=styles[name]["color"],
                label=label(runs[name].variant),
                alpha=0.8,
            )
        moved = np.concatenate([split["total"] for split in splits.values()])
        moved = moved[moved > 0]
        if moved.size:
            ax.plot(
                [moved.min(), moved.max()],
                [moved.min(), moved.max()],
                color="0.5",
                linewidth=0.8,
                label="all anisotropic",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=r"$\mathrm{dist}(S, \sigma^*_x I)$",
            ylabel=r"$\min_t \mathrm{dist}(S, t I)$",
        )
        ax.grid(True)
        ax.legend()
    return fig
