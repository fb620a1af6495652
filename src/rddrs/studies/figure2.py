"""The paper's Figure 2 at its own settings, as the rows in ``results/paper`` stand.

The figure2 group (``headline.figure2_study``) covers the whole test set, computed chunk by chunk
in short GPU sessions; its files hold whatever images have been computed, from CPUs and GPUs
(each file's sidecar says which session wrote which rows). ``read`` takes, at one training
sigma, every variant's rows on the images that all the compared variants have, so that every
comparison is paired image by image.

* ``panels``: ``read`` at every training sigma that has paired rows (Figure 2's panels);
* ``coverage``: which test images a panel holds, in words;
* ``writers``: rows per (device, commit) of each file;
* ``pace``: seconds per image of each variant on each kind of device;
* ``band``: a bootstrap band over images around a certified-accuracy curve;
* ``device_check``: the same certificate computed again here (an isotropic law at the rows'
  sigma, independent draws) for rows another device computed: the two lower bounds must agree
  within their Monte Carlo error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rddrs import RDDRSError
from rddrs.pipeline.provenance import index_ranges, row_writers
from rddrs.pipeline.results import read_rows, read_sidecar
from rddrs.studies import analysis
from rddrs.studies.claims import study_specs
from rddrs.studies.headline import FIGURE2_SIGMAS, figure2_study

#: the variants every paired comparison needs (RS, the authors' pipeline, the capped DDRS)
PAIRED = ("rs", "ddrs_clamped", "ancer_clamped", "rddrs_clamped", "ddrs_capped")


def read(results, sigma: float, *, preset: str = "paper", names=PAIRED, data="data",
         models="data/models") -> dict[str, analysis.Results]:
    """Each variant's rows at ``sigma`` on the images all of ``names`` have, ordered by idx."""
    study = figure2_study(preset, sigma)
    specs = study_specs(study, sigma, preset, results, data=data, models=models)
    found = {name: analysis.read_results(specs[name].out) for name in names if Path(specs[name].out).exists()}
    if len(found) < len(names):
        raise RDDRSError(f"{results} has no rows of {', '.join(sorted(set(names) - set(found)))} at sigma {sigma:g}")
    common = sorted(set.intersection(*(set(res.idx.tolist()) for res in found.values())))
    return {name: res.subset(np.flatnonzero(np.isin(res.idx, common))) for name, res in found.items()}


def panels(results, *, preset: str = "paper", sigmas=FIGURE2_SIGMAS, names=PAIRED, data="data",
           models="data/models") -> dict[float, dict[str, analysis.Results]]:
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


def band(res: analysis.Results, kind: str, radii, draws: int = 2000, level: float = 0.9,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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


def curves_figure(panels: dict[float, dict[str, analysis.Results]], labels: dict[str, str],
                  styles: dict[str, dict], kinds=("proxy", "l2"), draws: int = 2000):
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
                    (line,) = ax.step(x, y, where="pre", linewidth=1.8, color=style["color"],
                                      linestyle=style["linestyle"], label=labels[name])
                    lo, hi = band(res, kind, grid, draws)
                    ax.fill_between(grid, lo, hi, step="pre", color=style["color"], alpha=0.15, linewidth=0)
                    handles.setdefault(name, line)
                ax.set(xlim=(0, 1.05 * top), ylim=(0, 1.0), xlabel=analysis.AXIS_LABELS[kind])
                ax.set_title(f"$\\sigma = {sigma:g}$, {runs[next(iter(runs))].n} images", fontsize="medium")
                ax.grid(True)
            row[0].set_ylabel("certified accuracy")
        fig.legend(list(handles.values()), [labels[n] for n in handles], loc="outside upper center",
                   ncol=min(3, len(handles)), frameon=False)
    return fig


def device_check(path, indices, *, n: int = 100_000, alpha: float = 0.001, seed: int = 0, data="data",
                 models="data/models", device: str = "cpu") -> dict:
    """For rows of the isotropic run ``path`` (RS or DDRS) written on another device: CERTIFY
    again here with the row's sigma, fresh draws (another seed's streams), and both lower bounds
    on p_A side by side with the standard error of their difference; with this machine's
    provenance (``files.recorded``)."""
    import torch

    from rddrs.core.certify import certify
    from rddrs.core.noise import Isotropic
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.provenance import recorded
    from rddrs.pipeline.models import load_model, resolve_device

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
        out.append({"idx": i, "sigma": float(sigma[j]), "p_lower_there": there, "p_lower_here": here,
                    "predict_there": rows[i]["predict"], "predict_here": int(cert.predict[j]),
                    "difference": here - there, "standard_error": spread})
    return recorded(device, out)
