"""Why a smoothing law certifies what it does, and what its certificate guarantees.

Measures on the law ``S_x`` that a run certified at a test image x (sigma from its row, theta or C
from its trace), for the variants of ``headline.mechanism_study``:

* ``spectrum``: the scales of S (eigenvalues of C, theta, or sigma): how many exceed 1, 10, 100
  (pixel units: an image lies in [0, 1]^784, so a scale above 1 is noise larger than any image).
* ``constancy``: the smoothed classifier ``G_S(z) = argmax_c P[f(z + S eps) = c]`` with x's law
  held fixed, at other test images z of other classes (a pool drawn from the end of the test
  set), at an all-black image and at a uniform-noise image: the share of the votes that x's
  class gets there, and how often it wins. A law under which every image gets x's class makes a
  constant classifier, which is certifiably robust at any radius.
* ``axes``: the k largest axes of S: their cosine with x, with the gradient of x's logit margin,
  with the mean image of each class; and the network's class along each, at ``x + t v``.
* ``split``: x's share of the votes under the noise of S's axes above 1 alone, of its axes at
  most 1 alone, and of isotropic noise at S's smallest scale.

And the certificate as a guarantee about what is deployed, the classifier that searches its own
law at every input, ``h(z) = G_{S_z}(z)`` (``refutation``): inside a method's certified l2 ball
at x, a point x' found by projected gradient ascent on the isotropic smoothed classifier at
sigma_x* (``rddrs.studies.attack``), beyond DDRS' own radius; the method's whole pipeline then runs at
x' (its searches from their starts, and CERTIFY with fresh draws). A certified other class there
refutes the certificate as a statement about h (with confidence 1 - alpha); the law S_x held
fixed at x' says whether it holds as a statement about ``G_{S_x}``, the classifier it is about.

Draws: the votes use the check streams of ``rddrs.studies.validity`` keyed by ``KEY * idx + j``, the
pipeline at x' the method's streams keyed by ``idx + SHIFT``: independent of the runs' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.certify import ABSTAIN, certify
from rddrs.core.methods import DIAGONAL, FULL, ISOTROPIC, method as method_record
from rddrs.core.noise import Diagonal, FullSPD, Isotropic, Smoothing
from rddrs.core.optimize import find_smoothing
from rddrs.core.presets import Search, preset as preset_record
from rddrs.pipeline.provenance import provenance_parts
from rddrs.pipeline.results import model_path, read_rows, read_sidecar, traces_dir
from rddrs.pipeline.runs import load_smoothing
from rddrs.pipeline.settings import make_settings
from rddrs.studies.attack import attack
from rddrs.studies.claims import Study, Variant, _start_of
from rddrs.studies.validity import smoothed_probability

#: the pool of other test images: the first POOL_PER_CLASS images of each class from POOL_FIRST on
POOL_FIRST, POOL_PER_CLASS = 9000, 3
#: the images whose per-class means the axes are compared with
MEANS_RANGE = (5000, 9000)
#: offsets t along an axis v of S, at x + t v (pixel units)
STRETCH = np.concatenate([-np.logspace(4, -1, 11), np.logspace(-1, 4, 11)])
#: check-stream keys of an image's votes: KEY * idx + j; the pipeline at x' uses idx + SHIFT
KEY, SHIFT = 100, 100_000
THRESHOLDS = (1.0, 10.0, 100.0)


def pool(labels: Tensor, first: int = POOL_FIRST, per_class: int = POOL_PER_CLASS) -> np.ndarray:
    """Test indices of the pool: the first ``per_class`` images of each class from ``first`` on."""
    labels = labels.numpy()
    chosen = [i for c in range(int(labels.max()) + 1)
              for i in (np.flatnonzero(labels[first:] == c)[:per_class] + first)]
    return np.array(sorted(chosen))


def _repeat(law: Smoothing, count: int) -> Smoothing:
    """One law (batch 1) for ``count`` inputs."""
    return law.with_param(law.param.expand(count, *law.param.shape[1:]))


def shares(model, points: Tensor, law: Smoothing, samples: int, seed: int, key: int) -> np.ndarray:
    """Each point's share of votes per class (P, K) under the one law ``law`` (batch 1)."""
    keys = [KEY * key + j for j in range(len(points))]
    return smoothed_probability(model, points, _repeat(law, len(points)), None, samples, seed,
                                batch_size=20_000, indices=keys).p


def scales(law: Smoothing) -> np.ndarray:
    """The scales of S, ascending: the eigenvalues of C, theta sorted, or sigma d times."""
    if law.family == FULL:
        return torch.linalg.eigvalsh(law.param[0].double()).cpu().numpy()
    if law.family == DIAGONAL:
        return np.sort(law.param[0].double().cpu().numpy())
    return np.full(law.dim, float(law.param[0]))


def spectrum(law: Smoothing) -> dict:
    w = scales(law)
    return {"smallest": float(w[0]), "largest": float(w[-1]), "median": float(np.median(w)),
            "geometric_mean": float(np.exp(np.log(w).mean())),
            **{f"above_{t:g}": int((w > t).sum()) for t in THRESHOLDS}}


def top_axes(law: Smoothing, k: int) -> tuple[np.ndarray, Tensor] | None:
    """The k largest scales and their unit axes (k, d); None for isotropic noise (no axis)."""
    if law.family == ISOTROPIC:
        return None
    if law.family == DIAGONAL:
        theta = law.param[0].double()
        order = theta.argsort(descending=True)[:k]
        return theta[order].cpu().numpy(), torch.eye(law.dim, dtype=torch.float64, device=theta.device)[order]
    w, v = torch.linalg.eigh(law.param[0].double())
    return w.flip(0)[:k].cpu().numpy(), v.flip(1)[:, :k].T


def _cosine(a: Tensor, b: Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-300))


def margin_gradient(model, x: Tensor, label: int) -> Tensor:
    """The gradient at x of ``f_y(x) - max_{c != y} f_c(x)`` (logits), flattened, float64."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(leaf)[0]
        others = torch.cat([logits[:label], logits[label + 1:]])
        (grad,) = torch.autograd.grad(logits[label] - others.max(), leaf)
    return grad.reshape(-1).double()


def axes(model, x: Tensor, label: int, law: Smoothing, means: Tensor, k: int = 5) -> list[dict] | None:
    """The k largest axes of S: scale, cosines (image, margin gradient, best class mean), and the
    network's class along the axis at ``x + t v`` for t in ``STRETCH``."""
    found = top_axes(law, k)
    if found is None:
        return None
    scale, vectors = found
    flat, grad = x.reshape(-1).double(), margin_gradient(model, x, label)
    rows = []
    for s, v in zip(scale, vectors):
        cos_means = [_cosine(v, m) for m in means]
        t = torch.as_tensor(STRETCH, dtype=x.dtype, device=x.device)
        points = (x.reshape(1, -1) + t[:, None] * v.to(x)[None, :]).reshape(len(t), *x.shape[1:])
        with torch.no_grad():
            classes = model(points).argmax(1).cpu().numpy()
        rows.append({"scale": float(s), "cos_image": _cosine(v, flat), "cos_margin_gradient": _cosine(v, grad),
                     "cos_class_mean": float(max(cos_means)), "closest_class_mean": int(np.argmax(cos_means)),
                     "along": classes.tolist(), "share_own_class": float((classes == label).mean())})
    return rows


def split(model, x: Tensor, label: int, law: Smoothing, samples: int, seed: int, key: int,
          threshold: float = 1.0) -> dict | None:
    """x's share of the votes under S's axes above ``threshold`` alone, under those at most it
    alone, and under isotropic noise at S's smallest scale (None for isotropic noise)."""
    if law.family == ISOTROPIC:
        return None
    if law.family == DIAGONAL:
        theta = law.param
        big, small = Diagonal(theta * (theta > threshold), check=False), Diagonal(theta * (theta <= threshold), check=False)
    else:
        w, v = torch.linalg.eigh(law.param[0].double())

        def part(keep):
            return FullSPD(((v * (w * keep)) @ v.T).to(law.param)[None], check=False)

        big, small = part(w > threshold), part(w <= threshold)
    smallest = float(scales(law)[0])
    iso = Isotropic(torch.tensor([smallest], dtype=law.param.dtype, device=law.param.device), law.dim)
    out = {"scales_above": int((scales(law) > threshold).sum()), "smallest": smallest}
    for j, (name, part_law) in enumerate((("above", big), ("at_most", small), ("isotropic_smallest", iso))):
        out[name] = float(shares(model, x, part_law, samples, seed, KEY * key + 50 + j)[0, label])
    return out


def constancy(model, x: Tensor, label: int, law: Smoothing, others: Tensor, other_labels: np.ndarray,
              samples: int, seed: int, key: int) -> dict:
    """The smoothed classifier of x's law at other images: x's share of the votes and how often
    it wins, over the pool images of other classes, at an all-black image and a uniform-noise one."""
    keep = other_labels != label
    gen = torch.Generator().manual_seed(key)
    extra = torch.stack([torch.zeros_like(x[0]), torch.rand(x[0].shape, generator=gen).to(x)])
    points = torch.cat([others[keep], extra])
    votes = shares(model, points, law, samples, seed, key)
    pool_votes = votes[:-2]
    return {"others": int(keep.sum()), "share_own_class": float(pool_votes[:, label].mean()),
            "wins": float((pool_votes.argmax(1) == label).mean()),
            "their_own_class": float(pool_votes[np.arange(len(pool_votes)), other_labels[keep]].mean()),
            "black": float(votes[-2, label]), "noise": float(votes[-1, label]),
            "at_x": float(shares(model, x, law, samples, seed, KEY * key + 99)[0, label])}


# -- the pipeline at another point ---------------------------------------------------------------

def chain(study: Study, variant: Variant) -> list[Variant]:
    """The variants a variant's search starts from, first one first, and the variant itself."""
    links = [variant]
    while method_record(links[0].method).base is not None:
        links.insert(0, _start_of(study, links[0]))
    return links


def pipeline(model, x: Tensor, keys: list[int], study: Study, variant: Variant, sigma: float, preset: str,
             model_file: Path, seed: int = 0):
    """The variant's whole pipeline at the inputs x: each link of its chain searched from the one
    before, then CERTIFY; draws keyed by ``keys``. Returns the laws and the certificate."""
    chosen = preset_record(preset)
    start: dict = {}
    law = None
    for link in chain(study, variant):
        settings = make_settings(link.method, sigma, model_file, preset, seed=seed,
                                             search=link.search or None)
        searches = {k: Search.from_dict(v) for k, v in settings.search.items()}
        law, _ = find_smoothing(link.method, model, x, keys, sigma, seed, searches, **start)
        if link.method == "ddrs":
            start = {"sigma_star": law.param}
        elif link.method == "ancer":
            start = {**start, "theta": law.param}
    cert = certify(model, x, law, keys, chosen.n0, chosen.n, chosen.alpha, seed)
    return law, cert


#: the attacked points are images: each pixel in [0, 1] (refutations stored before this rule have no "box")
BOX = (0.0, 1.0)


def refutation(model, x: Tensor, labels: np.ndarray, indices: list[int], sigma_star: np.ndarray,
               radius: np.ndarray, laws: Smoothing, study: Study, variant: Variant, sigma: float, preset: str,
               model_file: Path, *, seed: int = 0, steps: int = 20, samples: int = 128, check: int = 10_000,
               inside: float = 0.999, chunk: int = 10) -> list[dict]:
    """For each image (certified with l2 radius ``radius`` > 0 by the variant, with the law
    ``laws[j]``), look for a point inside that ball and in ``BOX`` where the variant's whole pipeline certifies
    another class (see the module), ``chunk`` images at a time, and test there the law certified
    at x, held fixed."""
    rows = []
    for lo in range(0, len(x), chunk):
        part = slice(lo, lo + chunk)
        xs, ys, keys = x[part], labels[part], indices[part]
        iso = Isotropic(torch.as_tensor(sigma_star[part], dtype=x.dtype, device=x.device), x[0].numel())
        r = torch.as_tensor(inside * radius[part] / sigma_star[part], dtype=x.dtype, device=x.device)
        points = attack(model, xs, iso, torch.as_tensor(ys), r, steps, samples, seed=seed, indices=keys, box=BOX)
        _, cert = pipeline(model, points, [k + SHIFT for k in keys], study, variant, sigma, preset, model_file, seed)
        for j, idx in enumerate(keys):
            fixed = shares(model, points[j: j + 1], laws[lo + j: lo + j + 1], check, seed, idx + SHIFT)[0]
            predict, label = int(cert.predict[j]), int(ys[j])
            rows.append({"idx": int(idx), "variant": variant.name, "radius": float(radius[lo + j]),
                         "distance": float((points[j] - xs[j]).double().norm()), "predict": predict,
                         "abstain": predict == ABSTAIN, "refuted": predict not in (label, ABSTAIN),
                         "gap": float(cert.gap[j]), "l2_radius": float(cert.radius[j]),
                         "fixed_law_share": float(fixed[label]), "fixed_law_class": int(fixed.argmax()),
                         "box": list(BOX), "point_range": [float(points[j].min()), float(points[j].max())]})
    return rows


# -- the study ------------------------------------------------------------------------------------

def measure(runs: dict, images: Tensor, labels: Tensor, model, *, samples: int, seed: int = 0,
            device: str = "cpu", k: int = 5) -> list[dict]:
    """Spectrum, constancy, axes and split of every variant's law at each of its images
    (``runs``: ``claims.run_study``'s variants; ``images``/``labels``: the whole test set)."""
    others_idx = pool(labels)
    others = images[others_idx].to(device)
    other_labels = labels[others_idx].numpy()
    lo, hi = MEANS_RANGE
    means = [images[lo:hi][labels[lo:hi] == c].mean(0).reshape(-1).double().to(device)
             for c in range(int(labels.max()) + 1)]
    d = images[0].numel()
    rows = []
    for name, run in runs.items():
        for idx in run.results.idx.tolist():
            if idx in set(others_idx.tolist()):
                raise RDDRSError(f"test image {idx} is in the pool of other images; measure images below {POOL_FIRST}")
            x, label = images[idx: idx + 1].to(device), int(labels[idx])
            law = load_smoothing(run.path, [idx], d, torch.float32).to(device)
            rows.append({"variant": name, "method": run.variant.method, "idx": idx, "label": label,
                         "spectrum": spectrum(law),
                         "constancy": constancy(model, x, label, law, others, other_labels, samples, seed, idx),
                         "axes": axes(model, x, label, law, means, k),
                         "split": split(model, x, label, law, samples, seed, idx)})
    return rows


def _setup(preset: str, results, device: str, data, models):
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.models import load_model, resolve_device
    from rddrs.studies import claims, headline

    study = headline.mechanism_study(preset)
    runs = claims.run_study(study, headline.SIGMA, preset, results, device=device, data=data, models=models,
                            compute=False)
    images, labels = load_dataset(Path(data), train=False)
    model_file = model_path(headline.SIGMA, models)
    return study, runs, images, labels, load_model(model_file, device=resolve_device(device)), model_file


def measures(preset: str, results, *, device: str = "cpu", data="data", models="data/models",
             seed: int = 0) -> list[dict]:
    """``measure`` over the runs of ``headline.mechanism_study`` (complete, with their traces:
    compute them first, e.g. with ``rddrs sweep --groups mechanism``), cached in
    ``RESULTS/claims/mechanism/measures.json``."""
    from rddrs.pipeline.files import cached_json
    from rddrs.pipeline.provenance import recorded
    from rddrs.studies.headline import BUDGETS

    def compute():
        _, runs, images, labels, model, _ = _setup(preset, results, device, data, models)
        return recorded(device, measure(runs, images, labels, model, samples=BUDGETS[preset].mechanism_votes,
                                         seed=seed, device=device))

    path = Path(results) / "claims" / "mechanism" / "measures.json"
    return _checked(path, cached_json(path, compute, {"rows": list})["rows"], ("variant", "idx"))


def _checked(path: Path, rows, keys: tuple[str, ...]) -> list[dict]:
    """``rows``, read from ``path``, if each is an object with ``keys``; a one-line error otherwise."""
    if not (isinstance(rows, list) and all(isinstance(r, dict) and all(k in r for k in keys) for r in rows)):
        raise RDDRSError(f"{path} holds rows that are not objects with {', '.join(keys)}; move it away to "
                         "compute it again")
    return rows



#: the variants whose certificates are tested as guarantees about their pipeline, in this order
#: (then RDDRS' best variant)
REFUTED = ("rddrs_clamped", "ancer_clamped", "ddrs_clamped", "ddrs_capped")


def refutations(preset: str, results, *, device: str = "cpu", data="data", models="data/models",
                seed: int = 0, compute: bool = True) -> list[dict]:
    """``refutation`` of every certificate (correct, radius > 0) of the variants ``REFUTED`` and of
    RDDRS' best variant on the mechanism study's images, the attack at the clamped DDRS' sigma_x*;
    kept in ``RESULTS/claims/mechanism/refutations.json`` variant by variant, so that a stopped
    computation keeps the variants it finished and the next call does the others (``compute``:
    False, only read those); a variant whose laws are not here (``laws_kept``) is left out."""
    from rddrs.pipeline.files import read_json, write_atomic
    from rddrs.pipeline.provenance import recorded
    from rddrs.studies.headline import BUDGETS, SIGMA, mechanism_study

    budget = BUDGETS[preset]
    path = Path(results) / "claims" / "mechanism" / "refutations.json"
    stored = read_json(path, {"variants": dict}) if path.exists() else {"variants": {}}
    for entry in stored["variants"].values():
        _checked(path, entry.get("rows") if isinstance(entry, dict) else None, ("idx", "refuted"))
    study = None
    names = [*REFUTED, *[v.name for v in mechanism_study(preset).variants
                         if v.method == "rddrs" and v.name not in REFUTED]]
    for name in names:
        if name in stored["variants"] or not compute:
            continue
        if study is None:
            study, runs, images, labels, model, model_file = _setup(preset, results, device, data, models)
            start = runs["ddrs_clamped"].results
            star = dict(zip(start.idx.tolist(), start.sigma_min.tolist()))
        res = runs[name].results
        keep = np.flatnonzero((res.correct == 1) & (res.radius > 0))
        idx = res.idx[keep].tolist()
        if idx and not laws_kept(runs[name].path):  # e.g. a GPU session's run, landed without its traces
            continue
        rows = []
        if idx:
            laws = load_smoothing(runs[name].path, idx, images[0].numel(), torch.float32).to(device)
            rows = refutation(model, images[idx].to(device), labels[idx].numpy(), idx,
                              np.array([star[i] for i in idx]), res.radius[keep], laws, study, study.variant(name),
                              SIGMA, preset, model_file, seed=seed, steps=budget.refutation_steps,
                              samples=budget.refutation_samples, check=budget.mechanism_votes * 5)
        stored["variants"][name] = recorded(device, rows)
        write_atomic(path, [json.dumps(stored, indent=2).encode()])
    return [row for entry in stored["variants"].values() for row in entry["rows"]]


# -- what survives the memory --------------------------------------------------------------

def laws_kept(path) -> bool:
    """Whether the laws a run certified with are here: in its rows (RS, DDRS) or in its traces."""
    return method_record(read_sidecar(path)["settings"]["method"]).family == ISOTROPIC or \
        traces_dir(Path(path)).is_dir()


def survival(path, images: Tensor, labels: Tensor, progress: bool = False) -> dict:
    """The memory pass over the run ``path`` (``rddrs.pipeline.memory``) and what it leaves: how
    many certificates it kept, shrank, relabelled or found abstained; the l2 and proxy ACR before
    and after it; and, over all of ``images``, the test images of another class than a region's
    that lie in a region it keeps (``intruders``: such an image, arriving after the region's
    centre, gets the region's class from the memory; the centre itself is not counted) and, per
    region, the gauge of the nearest of them (``nearest_other``: 1 on the region's boundary, the
    factor by which its gap would have to grow to take one in)."""
    from rddrs.core.regions import KEPT, RELABELLED, SHRUNK, Regions, gauges
    from rddrs.pipeline.memory import ABSTAINED, apply_memory, read_memory_rows

    path = Path(path)
    if read_sidecar(path)["settings"].get("rotate") is not None:
        raise RDDRSError(f"{path} is a rotated run: its regions live in the rotated coordinates")
    after = read_memory_rows(apply_memory(path, images, 0, progress=progress, labels=labels))
    before = list(read_rows(path).values())
    stored = [r for r in after if r["memory"] != ABSTAINED and r["gap"] > 0]
    idx = [r["idx"] for r in stored]
    gauge = torch.zeros(0, len(images), dtype=torch.float64)
    if idx:
        regions = Regions(images[idx].flatten(1).double(), load_smoothing(path, idx, images[0].numel()),
                          torch.tensor([r["gap"] for r in stored], dtype=torch.float64))
        other = labels[None, :] != torch.tensor([r["predict"] for r in stored])[:, None]
        other[range(len(idx)), idx] = False  # a region's own centre is no other image
        gauge = torch.where(other, gauges(regions, images), torch.inf)

    def acr(rows, column):
        return float(np.mean([r[column] * r["correct"] for r in rows]))

    statuses = [r["memory"] for r in after]
    return {"images": len(after), "test_images": len(images),
            "statuses": {s: statuses.count(s) for s in (KEPT, SHRUNK, RELABELLED, ABSTAINED)},
            "before": {"l2": acr(before, "radius"), "proxy": acr(before, "proxy_radius")},
            "after": {"l2": acr(after, "radius"), "proxy": acr(after, "proxy_radius")},
            "intruders": int((gauge < 1).any(0).sum()), "regions_with_intruders": int((gauge < 1).any(1).sum()),
            "nearest_other": gauge.min(1).values.tolist()}


def check_laws_from(laws_from) -> None:
    """A one-line error unless ``laws_from`` is None or a folder holding result files with sidecars."""
    if laws_from is not None and not any(Path(laws_from).glob("*.tsv.json")):
        raise RDDRSError(f"--laws-from {laws_from}: " + ("no result files (NAME.tsv with its sidecar) there"
                         if Path(laws_from).is_dir() else "no such directory"))


def memories(preset: str, results, *, data="data", models="data/models", laws_from=None,
             progress: bool = False) -> dict:
    """``survival`` of each run of ``headline.mechanism_study`` whose laws are here (the rows of an
    isotropic run, the traces of the others), cached in ``RESULTS/claims/mechanism/memory.json``.
    ``laws_from``: a folder of reruns with their traces (``NAME.tsv``: the same settings, on the
    study's images, run on another machine) that stand in for runs whose own traces were not kept;
    each entry names the file it read, whether it is such a rerun, and the machines that wrote its
    rows."""
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.files import cached_json
    from rddrs.pipeline.settings import normalised
    from rddrs.studies.claims import study_specs
    from rddrs.studies.headline import SIGMA, mechanism_study

    results = Path(results)
    check_laws_from(laws_from)

    def usable(path: Path, own: Path) -> bool:
        if not path.exists() or not set(read_rows(own)) <= set(read_rows(path)):
            return False
        if normalised(read_sidecar(path)["settings"]) != normalised(read_sidecar(own)["settings"]):
            raise RDDRSError(f"{path} was run with other settings than {own}")
        return laws_kept(path)

    def compute():
        images, labels = load_dataset(Path(data), train=False)
        study = mechanism_study(preset)
        specs = study_specs(study, SIGMA, preset, results, data=data, models=models)
        entries = {}
        for variant in study.variants:
            own = Path(specs[variant.name].out)
            candidates = (own, Path(laws_from) / own.name) if laws_from else (own,)
            found = next((p for p in candidates if usable(p, own)), None)
            if found:
                source = found.resolve()
                devices = {part["device"] for part in provenance_parts(read_sidecar(found)) if "device" in part}
                entries[variant.name] = {
                    "source": str(source.relative_to(results.resolve()) if source.is_relative_to(results.resolve())
                                  else source), "rerun": found != own, "devices": sorted(devices),
                    **survival(found, images, labels, progress)}
        return {"order": "ascending idx", "variants": entries}

    path = results / "claims" / "mechanism" / "memory.json"
    variants = cached_json(path, compute, {"variants": dict})["variants"]
    if not all(isinstance(entry, dict) for entry in variants.values()):
        raise RDDRSError(f"{path} holds variants that are not objects; move it away to compute it again")
    return variants
