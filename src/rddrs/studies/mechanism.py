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

import base64
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.certify import ABSTAIN, certify
from rddrs.core.methods import method as method_record
from rddrs.core.noise import Isotropic, Smoothing
from rddrs.core.optimize import find_smoothing
from rddrs.core.presets import Search, preset as preset_record
from rddrs.pipeline.results import read_rows, read_sidecar
from rddrs.pipeline.runs import load_smoothing
from rddrs.pipeline.settings import default_inputs_per_batch, make_settings
from rddrs.studies.attack import attack
from rddrs.studies.study import Study, Variant, start_of
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
    chosen = [
        i for c in range(int(labels.max()) + 1) for i in (np.flatnonzero(labels[first:] == c)[:per_class] + first)
    ]
    return np.array(sorted(chosen))


def _repeat(law: Smoothing, count: int) -> Smoothing:
    """One law (batch 1) for ``count`` inputs."""
    return law.with_param(law.param.expand(count, *law.param.shape[1:]))


def shares(model, points: Tensor, law: Smoothing, samples: int, seed: int, key: int) -> np.ndarray:
    """Each point's share of votes per class (P, K) under the one law ``law`` (batch 1)."""
    keys = [KEY * key + j for j in range(len(points))]
    return smoothed_probability(
        model, points, _repeat(law, len(points)), None, samples, seed, batch_size=20_000, indices=keys
    ).p


def scales(law: Smoothing) -> np.ndarray:
    """The scales of S, ascending, in float64: the eigenvalues of C, theta sorted, or sigma d times."""
    return law.scales(float64=True)[0].cpu().numpy()


def spectrum(law: Smoothing) -> dict:
    w = scales(law)
    return {
        "smallest": float(w[0]),
        "largest": float(w[-1]),
        "median": float(np.median(w)),
        "geometric_mean": float(np.exp(np.log(w).mean())),
        **{f"above_{t:g}": int((w > t).sum()) for t in THRESHOLDS},
    }


def top_axes(law: Smoothing, k: int) -> tuple[np.ndarray, Tensor] | None:
    """The k largest scales and their unit axes (k, d); None for isotropic noise (no axis)."""
    found = law.axes()
    if found is None:
        return None
    w, v = found
    return w[0, :k].cpu().numpy(), v[0, :k]


def _cosine(a: Tensor, b: Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-300))


def margin_gradient(model, x: Tensor, label: int) -> Tensor:
    """The gradient at x of ``f_y(x) - max_{c != y} f_c(x)`` (logits), flattened, float64."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(leaf)[0]
        others = torch.cat([logits[:label], logits[label + 1 :]])
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
        rows.append(
            {
                "scale": float(s),
                "cos_image": _cosine(v, flat),
                "cos_margin_gradient": _cosine(v, grad),
                "cos_class_mean": float(max(cos_means)),
                "closest_class_mean": int(np.argmax(cos_means)),
                "along": classes.tolist(),
                "share_own_class": float((classes == label).mean()),
            }
        )
    return rows


def split(
    model, x: Tensor, label: int, law: Smoothing, samples: int, seed: int, key: int, threshold: float = 1.0
) -> dict | None:
    """x's share of the votes under S's axes above ``threshold`` alone, under those at most it
    alone, and under isotropic noise at S's smallest scale (None for isotropic noise)."""
    if law.scalar:
        return None
    big, small = law.masked(lambda s: s > threshold), law.masked(lambda s: s <= threshold)
    smallest = float(scales(law)[0])
    iso = Isotropic(torch.tensor([smallest], dtype=law.param.dtype, device=law.param.device), law.dim)
    out = {"scales_above": int((scales(law) > threshold).sum()), "smallest": smallest}
    for j, (name, part_law) in enumerate((("above", big), ("at_most", small), ("isotropic_smallest", iso))):
        out[name] = float(shares(model, x, part_law, samples, seed, KEY * key + 50 + j)[0, label])
    return out


def constancy(
    model,
    x: Tensor,
    label: int,
    law: Smoothing,
    others: Tensor,
    other_labels: np.ndarray,
    samples: int,
    seed: int,
    key: int,
) -> dict:
    """The smoothed classifier of x's law at other images: x's share of the votes and how often
    it wins, over the pool images of other classes, at an all-black image and a uniform-noise one."""
    keep = other_labels != label
    gen = torch.Generator().manual_seed(key)
    extra = torch.stack([torch.zeros_like(x[0]), torch.rand(x[0].shape, generator=gen).to(x)])
    points = torch.cat([others[keep], extra])
    votes = shares(model, points, law, samples, seed, key)
    pool_votes = votes[:-2]
    return {
        "others": int(keep.sum()),
        "share_own_class": float(pool_votes[:, label].mean()),
        "wins": float((pool_votes.argmax(1) == label).mean()),
        "their_own_class": float(pool_votes[np.arange(len(pool_votes)), other_labels[keep]].mean()),
        "black": float(votes[-2, label]),
        "noise": float(votes[-1, label]),
        "at_x": float(shares(model, x, law, samples, seed, KEY * key + 99)[0, label]),
    }


# -- the pipeline at another point ---------------------------------------------------------------


def chain(study: Study, variant: Variant) -> list[Variant]:
    """The variants a variant's search starts from, first one first, and the variant itself."""
    links = [variant]
    while method_record(links[0].method).base is not None:
        links.insert(0, start_of(study, links[0]))
    return links


def pipeline(
    model,
    x: Tensor,
    keys: list[int],
    study: Study,
    variant: Variant,
    sigma: float,
    preset: str,
    model_file: Path,
    seed: int = 0,
):
    """The variant's whole pipeline at the inputs x: each link of its chain searched from the one
    before, then CERTIFY; draws keyed by ``keys``. Returns the laws and the certificate."""
    chosen = preset_record(preset)
    start: dict = {}
    law = None
    for link in chain(study, variant):
        settings = make_settings(link.method, sigma, model_file, preset, seed=seed, search=link.search or None)
        searches = {k: Search.from_dict(v) for k, v in settings.search.items()}
        law, _ = find_smoothing(link.method, model, x, keys, sigma, seed, searches, **start)
        if link.method == "ddrs":
            start = {"sigma_star": law.param}
        elif link.method == "ancer":
            start = {**start, "start": law}
    cert = certify(model, x, law, keys, chosen.n0, chosen.n, chosen.alpha, seed)
    return law, cert


#: the attacked points are images: each pixel in [0, 1] (refutations stored before this rule have no "box")
BOX = (0.0, 1.0)


def encode_point(point: Tensor) -> str:
    """A point as one line of text: base64 of its float32 values, flattened (exact)."""
    return base64.b64encode(point.detach().float().cpu().reshape(-1).numpy().tobytes()).decode()


def decode_point(text: str) -> Tensor:
    """The flattened float32 point ``encode_point`` wrote."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())


def refutation(
    model,
    x: Tensor,
    labels: np.ndarray,
    indices: list[int],
    sigma_star: np.ndarray,
    radius: np.ndarray,
    laws: Smoothing | None,
    study: Study,
    variant: Variant,
    sigma: float,
    preset: str,
    model_file: Path,
    *,
    seed: int = 0,
    steps: int = 20,
    samples: int = 128,
    check: int = 10_000,
    inside: float = 0.999,
    chunk: int | None = None,
) -> list[dict]:
    """For each image (certified with l2 radius ``radius`` > 0 by the variant, with the law
    ``laws[j]``), look for a point inside that ball and in ``BOX`` where the variant's whole pipeline certifies
    another class (see the module), ``chunk`` images at a time, and test there the law certified
    at x, held fixed (``laws`` None: the laws are not here, and the fixed-law columns are None).
    ``chunk`` None: as many images as a run of the pipeline's largest search takes at once on
    x's device (``default_inputs_per_batch``: one image at the paper preset on a CPU)."""
    if chunk is None:
        chunk = min(
            default_inputs_per_batch(
                make_settings(link.method, sigma, model_file, preset, search=link.search or None, device=str(x.device))
            )
            for link in chain(study, variant)
        )
    rows = []
    for lo in range(0, len(x), chunk):
        part = slice(lo, lo + chunk)
        xs, ys, keys = x[part], labels[part], indices[part]
        iso = Isotropic(torch.as_tensor(sigma_star[part], dtype=x.dtype, device=x.device), x[0].numel())
        r = torch.as_tensor(inside * radius[part] / sigma_star[part], dtype=x.dtype, device=x.device)
        points = attack(model, xs, iso, torch.as_tensor(ys), r, steps, samples, seed=seed, indices=keys, box=BOX)
        _, cert = pipeline(model, points, [k + SHIFT for k in keys], study, variant, sigma, preset, model_file, seed)
        for j, idx in enumerate(keys):
            fixed = (
                None
                if laws is None
                else shares(model, points[j : j + 1], laws[lo + j : lo + j + 1], check, seed, idx + SHIFT)[0]
            )
            predict, label = int(cert.predict[j]), int(ys[j])
            rows.append(
                {
                    "idx": int(idx),
                    "variant": variant.name,
                    "radius": float(radius[lo + j]),
                    "distance": float((points[j] - xs[j]).double().norm()),
                    "predict": predict,
                    "abstain": predict == ABSTAIN,
                    "refuted": predict not in (label, ABSTAIN),
                    "gap": float(cert.gap[j]),
                    "l2_radius": float(cert.radius[j]),
                    "fixed_law_share": None if fixed is None else float(fixed[label]),
                    "fixed_law_class": None if fixed is None else int(fixed.argmax()),
                    "box": list(BOX),
                    "point_range": [float(points[j].min()), float(points[j].max())],
                    "point": encode_point(points[j]),
                }
            )
    return rows


# -- the study ------------------------------------------------------------------------------------


def measure(
    runs: dict, images: Tensor, labels: Tensor, model, *, samples: int, seed: int = 0, device: str = "cpu", k: int = 5
) -> list[dict]:
    """Spectrum, constancy, axes and split of every variant's law at each of its images
    (``runs``: ``study.run_study``'s variants; ``images``/``labels``: the whole test set)."""
    others_idx = pool(labels)
    others = images[others_idx].to(device)
    other_labels = labels[others_idx].numpy()
    lo, hi = MEANS_RANGE
    means = [
        images[lo:hi][labels[lo:hi] == c].mean(0).reshape(-1).double().to(device) for c in range(int(labels.max()) + 1)
    ]
    d = images[0].numel()
    rows = []
    for name, run in runs.items():
        for idx in run.results.idx.tolist():
            if idx in set(others_idx.tolist()):
                raise RDDRSError(f"test image {idx} is in the pool of other images; measure images below {POOL_FIRST}")
            x, label = images[idx : idx + 1].to(device), int(labels[idx])
            law = load_smoothing(run.path, [idx], d, torch.float32).to(device)
            rows.append(
                {
                    "variant": name,
                    "method": run.variant.method,
                    "idx": idx,
                    "label": label,
                    "spectrum": spectrum(law),
                    "constancy": constancy(model, x, label, law, others, other_labels, samples, seed, idx),
                    "axes": axes(model, x, label, law, means, k),
                    "split": split(model, x, label, law, samples, seed, idx),
                }
            )
    return rows


def survival(
    path, images: Tensor, labels: Tensor, progress: bool = False, points: dict[int, Tensor] | None = None
) -> dict:
    """The memory pass over the run ``path`` (``rddrs.pipeline.memory``) and what it leaves: how
    many certificates it kept, shrank, relabelled or found abstained; the l2 and proxy ACR before
    and after it; and, over all of ``images``, the test images of another class than a region's
    that lie in a region it keeps (``intruders``: such an image, arriving after the region's
    centre, gets the region's class from the memory; the centre itself is not counted) and, per
    region, the gauge of the nearest of them (``nearest_other``: 1 on the region's boundary, the
    factor by which its gap would have to grow to take one in). ``points``: attacked points x'
    by the test index of the image x whose certified ball holds them (``refutation``); for each,
    x's ``label``, ``own_gauge``, its gauge in x's stored region (below 1 inside; infinite when
    x's region is not stored), and ``answer``, the class of the stored regions that hold it (regions of two
    classes never meet), which the memory answers there (None: no stored region holds it)."""
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
    points = points or {}
    attacked = torch.full((0, len(points)), torch.inf, dtype=torch.float64)
    if idx:
        regions = Regions(
            images[idx].flatten(1).double(),
            load_smoothing(path, idx, images[0].numel()),
            torch.tensor([r["gap"] for r in stored], dtype=torch.float64),
        )
        other = labels[None, :] != torch.tensor([r["predict"] for r in stored])[:, None]
        other[range(len(idx)), idx] = False  # a region's own centre is no other image
        gauge = torch.where(other, gauges(regions, images), torch.inf)
        if points:
            attacked = gauges(regions, torch.stack([p.reshape(-1) for p in points.values()]))

    def at(j: int, i: int) -> dict:
        inside = np.flatnonzero(attacked[:, j].numpy() < 1)
        return {
            "idx": i,
            "label": int(labels[i]),
            "own_gauge": float(attacked[idx.index(i), j]) if i in idx else float("inf"),
            "answer": int(stored[inside[0]]["predict"]) if len(inside) else None,
        }

    def acr(rows, column):
        return float(np.mean([r[column] * r["correct"] for r in rows]))

    statuses = [r["memory"] for r in after]
    return {
        "images": len(after),
        "test_images": len(images),
        "statuses": {s: statuses.count(s) for s in (KEPT, SHRUNK, RELABELLED, ABSTAINED)},
        "before": {"l2": acr(before, "radius"), "proxy": acr(before, "proxy_radius")},
        "after": {"l2": acr(after, "radius"), "proxy": acr(after, "proxy_radius")},
        "intruders": int((gauge < 1).any(0).sum()),
        "regions_with_intruders": int((gauge < 1).any(1).sum()),
        "nearest_other": gauge.min(1).values.tolist(),
        "attacked": [at(j, i) for j, i in enumerate(points)],
    }
