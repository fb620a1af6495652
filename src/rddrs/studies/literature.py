"""Isotropic MNIST baselines of the literature, to put our rows on the field's scale.

The SmoothMix repository (Jeong et al., NeurIPS 2021; github.com/jh-jeong/smoothmix) releases the
certification logs behind its MNIST table: Cohen et al.'s CERTIFY on the 10000 test images with
n0 = 100, n = 10^5, alpha = 0.001, one log per trained model (columns ``idx label predict radius
correct time``). ``summarize`` reads such logs and gives, per training method, configuration and
sigma, the ACR of each log and their mean and spread. ``results/literature/smoothmix_mnist.tsv``
holds that summary for sigma 0.25 and 0.5 (its sidecar names the repository's commit); the book
reads it. These are certificates of one isotropic smoothed classifier, valid for every input at
once: not the same guarantee as a data-dependent certificate.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rddrs import RDDRSError

#: how the logs' folders name the training methods, and how the book names them
METHODS = {
    "cohen": "Gaussian augmentation",
    "stab": "Stability training",
    "macer": "MACER",
    "consistency/cohen": "Consistency",
    "salman": "SmoothAdv",
    "consistency/salman": "Consistency + SmoothAdv",
    "smoothmix": "SmoothMix",
}
_SIGMA = re.compile(r"noise_(\d+(?:\.\d+)?)")


def acr_of_log(path: Path) -> tuple[int, float]:
    """Images and ACR (the mean over images of radius x correct) of one certification log."""
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    if head[:5] != ["idx", "label", "predict", "radius", "correct"]:
        raise RDDRSError(f"{path} is not a certification log of Cohen et al.'s format (header {head[:5]})")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return len(rows), float(np.mean([float(r[3]) * int(r[4]) for r in rows]))


def _method(relative: str) -> str | None:
    for key in sorted(METHODS, key=len, reverse=True):
        if relative.startswith(key + "/") or relative.startswith(key + "_"):
            return key
    return None


def summarize(root: str | Path, sigmas=(0.25, 0.5)) -> list[dict]:
    """Per (method, configuration, sigma) of the logs under ``root`` (the repository's
    ``data/certify/mnist``): the logs, their images, and the mean and standard deviation of their ACR."""
    root = Path(root)
    groups: dict[tuple[str, str, float], list[float]] = {}
    images = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith("_acc")):
        relative = path.relative_to(root).as_posix()
        method, match = _method(relative), _SIGMA.search(relative)
        if method is None or match is None or float(match.group(1)) not in sigmas:
            continue
        parts = relative[len(method) :].strip("/_").split("/")[:-1]  # the folders below the method's
        config = "/".join(p for p in parts if not p.isdigit()) or "-"  # without a run's own number
        key = (method, config, float(match.group(1)))
        n, acr = acr_of_log(path)
        groups.setdefault(key, []).append(acr)
        images[key] = n
    return [
        {
            "method": METHODS[m],
            "folder": m,
            "configuration": c,
            "sigma": s,
            "logs": len(v),
            "images": images[(m, c, s)],
            "acr": float(np.mean(v)),
            "acr_sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
        }
        for (m, c, s), v in sorted(groups.items())
    ]


COLUMNS = ("method", "folder", "configuration", "sigma", "logs", "images", "acr", "acr_sd")


def write(rows: list[dict], out: str | Path, source: dict) -> None:
    """The summary as a tab-separated file, with a sidecar ``OUT.json`` naming its ``source``."""
    import json

    from rddrs.pipeline.files import write_atomic

    lines = ["\t".join(COLUMNS)] + ["\t".join(str(row[c]) for c in COLUMNS) for row in rows]
    write_atomic(Path(out), [("\n".join(lines) + "\n").encode()])
    write_atomic(Path(f"{out}.json"), [json.dumps(source, indent=2).encode()])


def read(path: str | Path) -> list[dict]:
    """The rows of a summary written by ``write``."""
    kinds = {"sigma": float, "logs": int, "images": int, "acr": float, "acr_sd": float}
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    if tuple(head) != COLUMNS:
        raise RDDRSError(f"{path} is not a literature summary (its header is not {' '.join(COLUMNS)})")
    return [{c: kinds.get(c, str)(v) for c, v in zip(head, line.split("\t"))} for line in lines[1:] if line]
