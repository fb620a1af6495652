"""A two-dimensional, three-class problem on which the certified regions can be drawn.

The data: two elongated Gaussian blobs (classes 0 and 1) lying side by side, both tilted by
``TILT`` degrees from the first axis, inside a noisy elliptical ring (class 2) of the same tilt.
The long boundaries, along the blobs, are oblique, so an ellipse with axes parallel to the
coordinate axes (ANCER) cannot follow the blobs, whereas a full SPD scale matrix (RDDRS) can.

The pipeline: a small MLP trained with Gaussian noise augmentation; for a few test points, the
DDRS, ANCER and RDDRS searches of ``rddrs.core.optimize.find_smoothing`` and Cohen's CERTIFY of
``rddrs.core.certify.certify``. Each result is a :class:`Region`, the ellipse
``{x + S u : ||u|| < r}`` of the scale matrix ``S`` and the gap ``r``.

Rotation: ``certified_regions(..., angle=a)`` runs the same pipeline on the problem turned by the
rotation ``U`` of angle ``a``: inputs ``U x``, classifier ``f(U^T .)`` (the trained classifier
composed with the rotation, ``rddrs.pipeline.runs.Rotated``) and noise draws ``U eps`` (the same
random numbers seen in the turned coordinates). The turned problem is then the original one
written in other coordinates, so whatever changes in a certificate comes from the smoothing
family, not from the classifier or the draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from torch import Tensor, nn

from rddrs import RDDRSError
from rddrs.core.certify import certify
from rddrs.core.optimize import find_smoothing
from rddrs.core.presets import Search
from rddrs.pipeline.runs import Rotated
from rddrs.studies.analysis import METHOD_LABELS
from rddrs.studies.display import method_style

#: orientation of the blobs and the ring, in degrees from the first axis
TILT = 15.0
#: per blob class: centre, and standard deviations along and across the tilt (blobs' own frame)
BLOBS = (((0.0, 0.4), (0.6, 0.13)), ((0.0, -0.4), (0.6, 0.13)))
#: semi-axes of the ring (class 2) along and across the tilt, and its relative radial spread
RING_AXES, RING_SPREAD = (2.3, 1.2), 0.06
NUM_CLASSES = 3

#: search settings for d = 2 (the papers' are tuned for MNIST): a few hundred draws per step,
#: in antithetic pairs (``Search.antithetic``, a variance reduction), suffice in two dimensions,
#: and the objectives level off within about 30 steps; DDRS and RDDRS steps are bounded
#: (``Search.max_step``); kappa is each paper's.
SEARCH = {
    "ddrs": Search(iterations=60, samples=500, lr=0.01, keep_best_every=10, max_step=0.1, antithetic=True),
    "ancer": Search(iterations=60, samples=500, lr=0.02, kappa=2.0, step="adam", antithetic=True),
    "rddrs": Search(iterations=60, samples=500, lr=1.0, kappa=1e-6, max_step=0.1, antithetic=True),
}
#: CERTIFY settings: the paper's n0, n and alpha (cheap in two dimensions)
N0, N, ALPHA = 100, 100_000, 0.001
SMOOTHED_METHODS = ("ddrs", "ancer", "rddrs")

#: class colours: for the blobs, two Okabe-Ito colours that no method uses; grey for the ring
CLASS_COLORS = ("#56B4E9", "#CC79A7", "#B0B0B0")


def rotation_matrix(angle: float, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The counter-clockwise rotation of ``angle`` degrees, ``[[cos, -sin], [sin, cos]]``."""
    a = math.radians(angle)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=dtype, device=device)


@dataclass
class ToyData:
    """Inputs ``x`` (N, 2) and labels ``y`` (N,)."""

    x: Tensor
    y: Tensor


def make_dataset(
    n_per_class: int = 200, seed: int = 0, angle: float = 0.0, dtype: torch.dtype = torch.float64, device=None
) -> ToyData:
    """``n_per_class`` points of each class drawn with ``seed``; the whole set is turned by
    ``angle`` degrees (on top of ``TILT``), so ``make_dataset(angle=a).x = U_a make_dataset().x``."""
    if int(n_per_class) != n_per_class or n_per_class < 1:
        raise RDDRSError(f"n_per_class must be an integer >= 1, got {n_per_class}")
    gen = torch.Generator().manual_seed(seed)  # drawn in float64 on the CPU, then converted
    f64 = torch.float64
    parts = [
        torch.tensor(centre, dtype=f64)
        + torch.tensor(spread, dtype=f64) * torch.randn(n_per_class, 2, generator=gen, dtype=f64)
        for centre, spread in BLOBS
    ]
    phase = 2 * math.pi * torch.rand(n_per_class, generator=gen, dtype=f64)
    radius = 1 + RING_SPREAD * torch.randn(n_per_class, generator=gen, dtype=f64)
    parts.append(radius[:, None] * torch.stack([phase.cos(), phase.sin()], 1) * torch.tensor(RING_AXES, dtype=f64))
    x = torch.cat(parts) @ rotation_matrix(TILT + angle).T
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    return ToyData(x.to(dtype=dtype, device=device), y.to(device))


def blob_centres(angle: float = 0.0, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The points we certify: the centres of the two blobs (classes 0 and 1), turned by ``angle``."""
    centres = torch.tensor([centre for centre, _ in BLOBS], dtype=dtype, device=device)
    return centres @ rotation_matrix(TILT + angle, dtype, device).T


def make_mlp(hidden: int = 64, seed: int = 0) -> nn.Sequential:
    """``2 -> hidden -> hidden -> 3`` with ReLU, initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
        )


def train_mlp(data: ToyData, sigma: float, steps: int = 300, lr: float = 0.01, seed: int = 0) -> nn.Module:
    """An MLP trained by full-batch Adam on cross-entropy, each step on fresh noisy copies
    ``x + sigma eps`` of the data; returned frozen (eval mode, no parameter gradients), in the
    data's dtype and on its device."""
    if not sigma >= 0:
        raise RDDRSError(f"sigma must be >= 0, got {sigma}")
    model = make_mlp(seed=seed).to(dtype=data.x.dtype, device=data.x.device)
    gen = torch.Generator(device=data.x.device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        noisy = data.x + sigma * torch.randn(data.x.shape, generator=gen, dtype=data.x.dtype, device=data.x.device)
        loss = nn.functional.cross_entropy(model(noisy), data.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model, data: ToyData) -> float:
    """Fraction of the points the (base) classifier labels correctly."""
    return (model(data.x).argmax(-1) == data.y).double().mean().item()


@dataclass
class Region:
    """A certified region ``{centre + S u : ||u|| < gap}`` (empty when the method abstains)."""

    method: str
    centre: np.ndarray
    scale: np.ndarray
    gap: float
    predict: int
    proxy_radius: float
    l2_radius: float

    @cached_property
    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Semi-axes of the ellipse, longest first, and their unit directions (columns): the
        singular values and left singular vectors of ``gap * S``."""
        directions, semi_axes, _ = np.linalg.svd(self.gap * self.scale)
        return semi_axes, directions

    @property
    def axis_angle(self) -> float:
        """Angle of the principal (longest) axis of S in degrees, in [0, 180); NaN when S is
        isotropic, where no axis is principal."""
        w, v = np.linalg.eigh(self.scale)
        if w[-1] - w[0] <= 1e-9 * w[-1]:
            return math.nan
        return math.degrees(math.atan2(v[1, -1], v[0, -1])) % 180.0

    def boundary(self, num: int = 200) -> np.ndarray:
        """``num`` points ``centre + gap S (cos t, sin t)`` on the region's boundary, (num, 2)."""
        t = np.linspace(0.0, 2 * np.pi, num)
        return self.centre + self.gap * np.stack([np.cos(t), np.sin(t)], 1) @ self.scale.T

    def patch(self, **style) -> Ellipse:
        """The region as a matplotlib ellipse (``style``: its colour, line style, ...)."""
        semi_axes, directions = self.axes
        angle = math.degrees(math.atan2(directions[1, 0], directions[0, 0]))
        return Ellipse(tuple(self.centre), 2 * semi_axes[0], 2 * semi_axes[1], angle=angle, **style)


def certified_regions(
    model,
    points: Tensor,
    sigma: float,
    angle: float = 0.0,
    methods=SMOOTHED_METHODS,
    seed: int = 0,
    settings: dict[str, Search] | None = None,
    n0: int = N0,
    n: int = N,
    alpha: float = ALPHA,
) -> dict[str, list[Region]]:
    """The certified region of every point for every method, on the problem turned by ``angle``.

    ``points`` (B, 2) are in the original coordinates; the regions are in the turned ones
    (centres ``U x``). DDRS is searched once and its sigma_x* starts (and floors) ANCER and
    RDDRS. ``settings`` override ``SEARCH`` per method.
    """
    unknown = sorted(set(methods) - set(SMOOTHED_METHODS))
    if unknown:
        raise RDDRSError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(SMOOTHED_METHODS)}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise RDDRSError(f"points must have shape (B, 2), got {tuple(points.shape)}")
    u = rotation_matrix(angle, points.dtype, points.device)
    turned_model, x = Rotated(model, u), points @ u.T
    indices = list(range(len(x)))
    settings = {**SEARCH, **(settings or {})}
    found = {"ddrs": find_smoothing("ddrs", turned_model, x, indices, sigma, seed, settings, rotation=u)[0]}
    for method in [m for m in methods if m != "ddrs"]:
        found[method] = find_smoothing(
            method, turned_model, x, indices, sigma, seed, settings, sigma_star=found["ddrs"].param, rotation=u
        )[0]
    regions = {}
    for method in methods:
        cert = certify(turned_model, x, found[method], indices, n0, n, alpha, seed, rotation=u)
        scales = found[method].matrix().detach().double().cpu().numpy()
        centres = x.detach().double().cpu().numpy()
        regions[method] = [
            Region(
                method,
                centres[i],
                scales[i],
                float(cert.gap[i]),
                int(cert.predict[i]),
                float(cert.proxy_radius[i]),
                float(cert.radius[i]),
            )
            for i in indices
        ]
    return regions


def rotation_summary(original: dict[str, list[Region]], turned: dict[str, list[Region]], angle: float) -> list[dict]:
    """One row per point and method: proxy radius and principal-axis angle before and after
    the problem is turned by ``angle``, and how far the axis turned (mod 180; ``angle`` for a
    family that turns with the data)."""
    rows = []
    for method, regions in original.items():
        for point, (before, after) in enumerate(zip(regions, turned[method])):
            rows.append(
                {
                    "point": point,
                    "method": method,
                    "proxy_original": before.proxy_radius,
                    "proxy_turned": after.proxy_radius,
                    "axis_original": before.axis_angle,
                    "axis_turned": after.axis_angle,
                    "axis_turn": (after.axis_angle - before.axis_angle) % 180.0,
                }
            )
    return rows


def summary_table(rows: list[dict], angle: float):
    """``rotation_summary`` as a :class:`rddrs.studies.display.Table`: proxy radii to 3 decimals, axis
    angles to 0.1 degree, a dash where S has no principal axis (DDRS)."""
    from rddrs.studies.display import Table

    return Table(
        ["method", "point", "before", "after", "before ", "after ", "turned by"],
        [
            [
                METHOD_LABELS[r["method"]],
                r["point"],
                r["proxy_original"],
                r["proxy_turned"],
                r["axis_original"],
                r["axis_turned"],
                r["axis_turn"],
            ]
            for r in rows
        ],
        caption=f"Proxy radius and principal axis (degrees from x1, modulo 180) of each "
        f"certified region before and after the problem is turned by {angle:g}°.",
        spans=[("", 2), ("proxy radius", 2), ("principal axis (°)", 3)],
        merge=["method"],
        formats={"before": ".3f", "after": ".3f", "before ": ".1f", "after ": ".1f", "turned by": ".1f"},
    )


# -- plotting ---------------------------------------------------------------------------------


@torch.no_grad()
def plot_decision_regions(ax, model, extent: float, like: Tensor, resolution: int = 300) -> None:
    """Fill ``[-extent, extent]^2`` with the base classifier's class colours (evaluated on a
    ``resolution`` x ``resolution`` grid in ``like``'s dtype and device)."""
    axis = torch.linspace(-extent, extent, resolution, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    labels = model(grid).argmax(-1).reshape(resolution, resolution).cpu().numpy()
    ax.imshow(
        labels,
        origin="lower",
        extent=(-extent, extent, -extent, extent),
        interpolation="nearest",
        cmap=ListedColormap(CLASS_COLORS),
        vmin=-0.5,
        vmax=NUM_CLASSES - 0.5,
        alpha=0.35,
    )


def plot_data(ax, data: ToyData) -> None:
    """The points, coloured by class."""
    x, y = data.x.detach().cpu().numpy(), data.y.cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], c=np.asarray(CLASS_COLORS)[y], s=6, edgecolors="0.25", linewidths=0.3)


def plot_regions(ax, regions: dict[str, list[Region]]) -> None:
    """Each method's certified regions in its colour and line style, and the certified points."""
    for method, method_regions in regions.items():
        style = method_style(method)
        for region in method_regions:
            ax.add_patch(
                region.patch(fill=False, edgecolor=style["color"], linestyle=style["linestyle"], linewidth=2.0)
            )
    centres = np.array([region.centre for region in next(iter(regions.values()))])
    ax.scatter(centres[:, 0], centres[:, 1], marker="x", color="k", s=40, linewidths=1.5, zorder=3)


def plot_problem(
    ax, model, data: ToyData, regions: dict[str, list[Region]], extent: float = 2.8, title: str | None = None
) -> None:
    """Decision regions, data and certified regions on one panel, equal axis scales, legend."""
    plot_decision_regions(ax, model, extent, like=data.x)
    plot_data(ax, data)
    plot_regions(ax, regions)
    handles = [Line2D([], [], linewidth=2.0, **method_style(m)) for m in regions]
    handles.append(Line2D([], [], color="k", marker="x", linestyle="none", label="certified point"))
    ax.legend(handles=handles, loc="upper left", framealpha=0.9)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)


def plot_proxy_by_angle(ax, by_angle: dict[float, dict[str, list[Region]]], point: int) -> None:
    """Proxy radius of one point against the orientation of the blobs, ``TILT + angle``, from
    ``{angle: certified_regions(..., angle)}``."""
    angles = sorted(by_angle)
    orientation = TILT + np.asarray(angles, dtype=float)
    for method in by_angle[angles[0]]:
        radii = [by_angle[a][method][point].proxy_radius for a in angles]
        ax.plot(orientation, radii, linewidth=2.0, marker="o", markersize=4, **method_style(method))
    ax.set_xticks(orientation)
    ax.set_xlabel("orientation of the blobs (degrees from the $x_1$ axis)")
    ax.set_ylabel("proxy radius")
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.legend(framealpha=0.9)
