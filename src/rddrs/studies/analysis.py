"""Certified-accuracy curves, tables and figures from certification result files.

A result file is the tab-separated output of ``rddrs certify``: a header row, then one row per
certified test input with at least the columns ``idx label predict correct gap radius
proxy_radius sigma_min seconds`` (``predict`` is -1 on abstain, ``radius`` is the l2 radius
``r * lambda_min(S)`` and ``proxy_radius`` is ``r * det(S)^(1/d)``, the radius of the l2 ball of
equal volume). Beside ``X.tsv`` lies the JSON sidecar ``X.tsv.json`` naming at least the method,
the training sigma and the preset.

For a set of n inputs with certified radii ``R_i`` and correctness flags ``c_i`` the (approximate)
certified accuracy of Cohen et al. (2019) at radius r is

    CA(r) = (1/n) * #{i : c_i = 1 and R_i >= r},

a non-increasing, left-continuous step function of r with CA(0) = fraction correct (an
abstention is never correct). The average certified radius is ACR = (1/n) * sum_i c_i R_i.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rddrs import RDDRSError
from rddrs.core.methods import (  # also the order in which they are drawn and tabulated
    METHODS as _RECORDS,
    NAMES as METHODS,
)
from rddrs.pipeline.data import MNIST, TEST_SIZE
from rddrs.pipeline.files import write_atomic
from rddrs.pipeline.results import (
    INT_COLUMNS,
    REQUIRED,
    ends_mid_line,
    read_sidecar,
    read_table,
    sidecar_path as _sidecar_path,
)

# the name each method goes by in tables and figures (``rddrs.core.methods``)
METHOD_LABELS = {m.name: m.label for m in _RECORDS.values()}

KINDS = ("proxy", "l2")
KIND_LABELS = {
    "proxy": "proxy radius (ℓ2 radius of the ball of equal volume)",
    "l2": "ℓ2 radius",
}
# axis labels in mathtext, short enough for a third of the page (the captions say more)
AXIS_LABELS = {
    "proxy": "proxy radius",
    "l2": "$\\ell_2$ radius",
}
KIND_COLUMNS = {"proxy": "proxy_radius", "l2": "radius"}

DEFAULT_RADII = tuple(0.5 * k for k in range(9))  # 0, 0.5, ..., 4.0

#: the columns of a result file (``results.REQUIRED``) that ``Results`` holds as numeric arrays
#: the classes of every dataset here
CLASSES = len(MNIST.classes)
ARRAY_COLUMNS = tuple(c for c in REQUIRED if c not in ("sigma_proxy", "sigma_max", "p_lower"))
#: the per-row arrays of ``Results``: those and the search status (``ok`` in files written
#: before the column existed)
ROW_FIELDS = ARRAY_COLUMNS + ("search",)


@dataclass
class Results:
    """One result file: a numpy array per column (row order kept) plus its sidecar.

    ``method``, ``sigma`` and ``preset`` come from the sidecar or from the caller; they are
    ``None`` when neither knows them.
    """

    path: Path
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    correct: np.ndarray
    gap: np.ndarray
    radius: np.ndarray
    proxy_radius: np.ndarray
    sigma_min: np.ndarray
    seconds: np.ndarray
    search: np.ndarray | None = None  # per row: ok, diverged@ITER or - (no search); None: all ok
    meta: dict = field(default_factory=dict)
    method: str | None = None
    sigma: float | None = None
    preset: str | None = None
    has_sidecar: bool = False
    partial: bool = False  # the file ends in half a row (its run still writing, or stopped), left out

    def __post_init__(self):
        if self.search is None:
            self.search = np.full(self.idx.shape, "ok", dtype=object)

    @property
    def n(self) -> int:
        """Number of certified inputs."""
        return int(self.idx.size)

    @property
    def diverged(self) -> int:
        """Number of inputs whose search stopped because a step overflowed (``diverged@ITER``)."""
        return int(sum(str(s).startswith("diverged") for s in self.search))

    def subset(self, keep) -> "Results":
        """The rows at the positions ``keep``, in ascending idx (the sidecar and names kept)."""
        keep = np.asarray(keep)
        keep = keep[np.argsort(self.idx[keep])]
        return replace(self, **{name: getattr(self, name)[keep] for name in ROW_FIELDS})

    def radii(self, kind: str = "proxy") -> np.ndarray:
        """Certified radius of each input: ``proxy_radius`` for ``proxy``, ``radius`` for ``l2``."""
        return getattr(self, KIND_COLUMNS[_check_kind(kind)])


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RDDRSError(f"unknown radius kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def _parse_sigma(value, where: str) -> float:
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        raise RDDRSError(f"{where}: sigma {value!r} is not a number") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise RDDRSError(f"{where}: sigma must be a positive number, got {value!r}")
    return sigma


def read_results(path, method: str | None = None, sigma: float | None = None) -> Results:
    """Read a result file and its sidecar ``path + '.json'`` (if present).

    The sidecar's ``method``, ``sigma`` and ``preset`` are read at its top level or inside its
    ``settings`` object. ``method`` and ``sigma`` stand in for a missing sidecar (or missing
    keys); if the sidecar names a different value it is an error. Every row is checked: integers
    where integers are due, ``idx`` in the test set, ``label`` a class, ``correct`` in {0, 1} and
    equal to ``predict == label``, ``predict`` a class or -1, unique ``idx``, finite non-negative
    radii on correct rows. Problems raise :class:`RDDRSError` naming the file and the line (the
    header is line 1). A last line without its line end is
    half a row (its run still writing, or stopped): it is left out, and ``partial`` says so.
    """
    path = Path(path)
    if not path.is_file():
        raise RDDRSError(f"{path}: no such result file")
    rows = list(_checked_rows(path))
    if not rows:
        raise RDDRSError(f"{path}: no result rows below the header")

    cols = {
        name: np.array([r[name] for r in rows], dtype=np.int64 if name in INT_COLUMNS else np.float64)
        for name in ARRAY_COLUMNS
    }
    cols["search"] = np.array([r.get("search", "ok") for r in rows], dtype=object)
    res = Results(path=path, **cols, partial=ends_mid_line(path))

    meta = read_sidecar(path, optional=True)
    res.has_sidecar = meta is not None
    res.meta = dict(meta or {})
    side = _sidecar_path(path)
    # the keys may sit at the top level or inside the "settings" object of rddrs certify
    nested = res.meta.get("settings") if isinstance(res.meta.get("settings"), dict) else {}
    info = {
        k: res.meta[k] if k in res.meta else nested[k]
        for k in ("method", "sigma", "preset")
        if k in res.meta or k in nested
    }
    if "method" in info:
        m = str(info["method"]).lower()
        if m not in METHODS:
            raise RDDRSError(f"{side}: unknown method {info['method']!r} (expected one of {', '.join(METHODS)})")
        if method is not None and method.lower() != m:
            raise RDDRSError(f"{path}: method {method!r} given, but the sidecar says {m!r}")
        res.method = m
    elif method is not None:
        if method.lower() not in METHODS:
            raise RDDRSError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
        res.method = method.lower()
    if "sigma" in info:
        s = _parse_sigma(info["sigma"], str(side))
        if sigma is not None and not math.isclose(float(sigma), s, rel_tol=1e-9):
            raise RDDRSError(f"{path}: sigma {sigma} given, but the sidecar says {s}")
        res.sigma = s
    elif sigma is not None:
        res.sigma = _parse_sigma(sigma, str(path))
    if info.get("preset") is not None:
        res.preset = str(info["preset"])
    return res


def _checked_rows(path: Path):
    """The rows of ``results.read_table`` (the reader that resuming runs use too), each checked
    for what the statistics assume."""
    for line, row in read_table(path, ARRAY_COLUMNS)[1]:
        where = f"{path} line {line}"
        if not 0 <= row["idx"] < TEST_SIZE:
            raise RDDRSError(f"{where}: idx {row['idx']} is outside the test set (0..{TEST_SIZE - 1})")
        if not (0 <= row["label"] < CLASSES and row["predict"] < CLASSES):
            raise RDDRSError(
                f"{where}: label {row['label']} or predict {row['predict']} is no class (0..{CLASSES - 1})"
            )
        if row["correct"] not in (0, 1):
            raise RDDRSError(f"{where}: column 'correct' must be 0 or 1, got {row['correct']}")
        if row["predict"] < -1:
            raise RDDRSError(f"{where}: column 'predict' must be a class or -1 (abstain), got {row['predict']}")
        if row["correct"] != int(row["predict"] == row["label"]):
            raise RDDRSError(f"{where}: correct={row['correct']} but predict={row['predict']} and label={row['label']}")
        if row["correct"]:
            for c in ("radius", "proxy_radius"):
                if not (math.isfinite(row[c]) and row[c] >= 0):
                    raise RDDRSError(
                        f"{where}: column {c!r} must be a finite radius >= 0 on a correct row, got {row[c]!r}"
                    )
        yield row


# --------------------------------------------------------------------------- statistics
def _certified_radii(results: Results, kind: str) -> np.ndarray:
    """Radii of the correctly classified inputs only (abstains and errors certify nothing)."""
    return results.radii(kind)[results.correct == 1]


def certified_radius(results: Results, kind: str = "proxy") -> np.ndarray:
    """Certified radius of every input, in row order: 0 where the prediction is wrong or abstains."""
    return np.where(results.correct == 1, results.radii(kind), 0.0)


def certified_accuracy(results: Results, radii, kind: str = "proxy") -> np.ndarray:
    """CA(r) = #{i : correct_i = 1 and R_i >= r} / n for each r in ``radii``.

    ``R_i`` is the proxy radius (``kind="proxy"``) or the l2 radius (``kind="l2"``). The result
    has the shape of ``radii``; CA(0) is the fraction of inputs predicted correctly (abstentions
    count as wrong).
    """
    r = np.asarray(radii, dtype=np.float64)
    if np.isnan(r).any():
        raise RDDRSError("certified_accuracy: a radius is NaN")
    if results.n == 0:
        raise RDDRSError(f"{results.path}: no inputs")
    cert = np.sort(_certified_radii(results, kind))
    # number of certified radii >= r  ==  len - (number of radii < r)
    count = cert.size - np.searchsorted(cert, r, side="left")
    return count / results.n


def average_certified_radius(results: Results, kind: str = "proxy") -> float:
    """ACR = (1/n) * sum_i correct_i * R_i (wrong predictions and abstentions count as 0)."""
    if results.n == 0:
        raise RDDRSError(f"{results.path}: no inputs")
    return float(_certified_radii(results, kind).sum() / results.n)


def certified_accuracy_curve(results: Results, kind: str = "proxy", r_max: float | None = None):
    """Exact step curve of CA(r) on [0, r_max] as arrays ``(x, y)`` for ``step(where="pre")``.

    With the distinct certified radii u_1 < ... < u_k, CA is constant on each (u_{j-1}, u_j]
    with value CA(u_j), and 0 after u_k.
    """
    cert = np.sort(_certified_radii(results, kind))
    u = np.unique(cert)
    top = float(u[-1]) if u.size else 0.0
    r_max = max(top, 0.0) if r_max is None else max(float(r_max), top)
    x = np.concatenate([[0.0], u, [r_max]])
    y = np.concatenate([certified_accuracy(results, [0.0, *u], kind), [0.0]])
    return x, y


# --------------------------------------------------------------------------- grouping
def _key(res: Results) -> tuple[float, str]:
    return (round(res.sigma, 9), res.method)


def group_results(results: Iterable[Results] | Mapping) -> dict[tuple[float, str], Results]:
    """Index results by (sigma, method), sorted by sigma then method order.

    Errors: a result with no method or sigma, two different files for one (sigma, method)
    (the same file given twice is kept once), or files from different presets.
    """
    if isinstance(results, Mapping):
        results = list(results.values())
    groups: dict[tuple[float, str], Results] = {}
    presets: dict[str, Path] = {}
    for res in results:
        if res.method is None or res.sigma is None:
            lack = " and ".join(w for w, v in (("method", res.method), ("sigma", res.sigma)) if v is None)
            if not res.has_sidecar:
                raise RDDRSError(
                    f"{res.path}: no sidecar {_sidecar_path(res.path).name}; give the {lack} (--method, --sigma)"
                )
            raise RDDRSError(f"{res.path}: the sidecar does not say the {lack}; give it (--method, --sigma)")
        key = _key(res)
        if key in groups:
            other = groups[key]
            if other.path.resolve() == res.path.resolve():
                continue
            raise RDDRSError(
                f"two result files for method {res.method} at sigma {res.sigma:g}: {other.path} and {res.path}"
            )
        if res.preset is not None:
            presets.setdefault(res.preset, res.path)
            if len(presets) > 1:
                (p1, f1), (p2, f2) = list(presets.items())[:2]
                raise RDDRSError(f"results from different presets mixed: {p1!r} ({f1}) and {p2!r} ({f2})")
        groups[key] = res
    if not groups:
        raise RDDRSError("no result files given")
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))))


# --------------------------------------------------------------------------- figure
def curves_figure(groups, kind: str = "proxy", path=None):
    """Figure 2 of the paper: CA(r) against r, one panel per training sigma, methods as lines.

    ``groups`` is an iterable of :class:`Results` or the dict of :func:`group_results`. Panels
    are sorted by sigma (three per row), share the y axis [0, 1] and each runs from 0 to a
    little past its largest certified radius; one legend above the panels names the methods,
    which keep one colour and dash pattern everywhere (``display.METHOD_STYLES``). The figure is as
    wide as the book's page, in the book's style (``rddrs.studies.display``). It is saved to ``path``
    if given (format from the extension: .png at 200 dpi, .svg, .pdf) and returned (a
    ``matplotlib.figure.Figure``, not tied to pyplot).
    """
    from rddrs.studies import display

    _check_kind(kind)
    groups = group_results(groups)
    sigmas = sorted({s for s, _ in groups})
    ncols = min(len(sigmas), 3)
    nrows = math.ceil(len(sigmas) / ncols)
    width = display.PAGE_WIDTH if ncols > 1 else 0.5 * display.PAGE_WIDTH + 0.4
    with display.style_context():
        fig, axes = display.new_figure(nrows, ncols, height=2.5 * nrows + 0.45, width=width, sharey=True, squeeze=False)
        axes = axes.ravel()
        for ax in axes[len(sigmas) :]:
            fig.delaxes(ax)
        handles = {}
        for ax, sigma in zip(axes, sigmas):
            members = [(m, groups[(sigma, m)]) for m in METHODS if (sigma, m) in groups]
            top = max((float(_certified_radii(res, kind).max(initial=0.0)) for _, res in members), default=0.0)
            x_max = 1.05 * top if top > 0 else 1.0
            for method, res in members:
                x, y = certified_accuracy_curve(res, kind, r_max=x_max)
                (line,) = ax.step(x, y, where="pre", linewidth=1.8, **display.method_style(method))
                handles.setdefault(method, line)
            ax.set_xlim(0.0, x_max)
            ax.set_ylim(0.0, 1.0)
            ax.set_title(f"σ = {sigma:g}")
            ax.set_xlabel(AXIS_LABELS[kind])
            ax.grid(True)
            ax.set_axisbelow(True)
        for row in range(nrows):
            axes[row * ncols].set_ylabel("certified accuracy")
        ordered = [handles[m] for m in METHODS if m in handles]
        fig.legend(
            ordered, [h.get_label() for h in ordered], loc="outside upper center", ncol=len(ordered), frameon=False
        )
        if path is not None:  # drawn in memory, then written whole: a full disk leaves no empty image
            path = Path(path)
            image = io.BytesIO()
            fig.savefig(image, format=path.suffix.lstrip(".") or "png", dpi=display.STYLE["savefig.dpi"])
            write_atomic(path, [image.getvalue()])
    return fig


# --------------------------------------------------------------------------- tables
def table(groups, radii: Sequence[float] = DEFAULT_RADII, kind: str = "proxy") -> list[dict]:
    """One row per (sigma, method): n, CA at each radius, ACR and mean seconds per input.

    Rows are dicts with keys ``sigma, method, n, radii`` (the radii), ``accuracy`` (array of
    CA(r)), ``acr``, ``acr_se`` (the ACR's standard error over the inputs, NaN for one input),
    ``seconds`` and ``kind``; sorted by sigma, then rs, ddrs, ancer, rddrs.
    """
    _check_kind(kind)
    radii = np.asarray(list(radii), dtype=np.float64)
    rows = []
    for (sigma, method), res in group_results(groups).items():
        certified = certified_radius(res, kind)  # 0 where wrong or abstained, as in the ACR
        se = float(certified.std(ddof=1) / math.sqrt(res.n)) if res.n > 1 else math.nan
        rows.append(
            {
                "sigma": res.sigma,
                "method": method,
                "n": res.n,
                "kind": kind,
                "radii": radii,
                "accuracy": certified_accuracy(res, radii, kind),
                "acr": average_certified_radius(res, kind),
                "acr_se": se,
                "seconds": float(np.mean(res.seconds)),
            }
        )
    return rows


def _radii_of(rows: list[dict]) -> np.ndarray:
    if not rows:
        raise RDDRSError("empty table")
    return rows[0]["radii"]


def table_csv(rows: list[dict]) -> str:
    """CSV text: ``sigma,method,n,ca@R...,acr,seconds_per_input`` with fixed decimals."""
    radii = _radii_of(rows)
    lines = [",".join(["sigma", "method", "n", *(f"ca@{r:g}" for r in radii), "acr", "seconds_per_input"])]
    for row in rows:
        lines.append(
            ",".join(
                [
                    f"{row['sigma']:g}",
                    row["method"],
                    str(row["n"]),
                    *(f"{a:.3f}" for a in row["accuracy"]),
                    f"{row['acr']:.3f}",
                    f"{row['seconds']:.3f}",
                ]
            )
        )
    return "\n".join(lines) + "\n"


def accuracy_table(rows: list[dict], caption: str | None = None, *, counts: bool = True, errors: bool = False):
    """The rows of :func:`table` as a :class:`rddrs.studies.display.Table`: sigma, method, n, CA at
    each radius (under one spanning header), ACR and seconds per input; sigma written once
    per group. A certified accuracy is a count over n inputs, so it gets the decimals that
    show every count (2 for n <= 100, 3 up to 1000, ...); ACR gets 3. ``counts=False`` leaves out n and the seconds
    (for a page that states them elsewhere); ``errors=True`` writes each ACR with its standard error
    over the inputs ("0.512 ± 0.031")."""
    from rddrs.studies import display

    radii = _radii_of(rows)
    kind = rows[0].get("kind", "proxy")
    ca = [f"{r:g}" for r in radii]
    acr = "ACR ± s.e." if errors else "ACR"
    lead, tail = (["σ", "method", "n"], [acr, "s / input"]) if counts else (["σ", "method"], [acr])
    body = []
    for row in rows:
        start = [row["sigma"], METHOD_LABELS[row["method"]]] + ([row["n"]] if counts else [])
        value = f"{row['acr']:.3f} ± {row['acr_se']:.3f}" if errors else row["acr"]
        end = [value] + ([row["seconds"]] if counts else [])
        body.append([*start, *row["accuracy"], *end])
    if caption is None:
        caption = f"Certified accuracy at {KIND_LABELS[kind]} r, average certified radius (ACR) and seconds per input."
    columns = [*lead, *ca, *tail]
    n = max(row["n"] for row in rows)
    digits = max(2, math.ceil(math.log10(n))) if n > 1 else 2
    formats = {"σ": ".2f", **{c: f".{digits}f" for c in ca}, "ACR": ".3f", "s / input": ".2f"}
    return display.Table(
        columns,
        body,
        caption,
        merge=["σ"],
        spans=[("", len(lead)), ("certified accuracy at r =", len(ca)), ("", len(tail))],
        formats={c: f for c, f in formats.items() if c in columns},
    )


def table_markdown(rows: list[dict]) -> str:
    """Markdown pipe table: one header row, one row per (sigma, method)."""
    return accuracy_table(rows).markdown()


def write_tables(rows: list[dict], csv_path, md_path) -> None:
    """Write the table as CSV to ``csv_path`` and as Markdown to ``md_path``."""
    for p, text in ((csv_path, table_csv(rows)), (md_path, table_markdown(rows))):
        write_atomic(Path(p), [text.encode("utf-8")])
