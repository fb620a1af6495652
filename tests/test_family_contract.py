"""The family contract (``rddrs.core.noise``): the smoothing family answers every question the
rest of the package asks, and no module outside ``core/noise.py`` asks which family a law is.

The proof is a fifth family that lives in this file only: ``FramedIsotropic``, isotropic noise
with its own scale on the image's outer frame, ``S = diag(sigma_inside on the inner pixels,
sigma_frame on the frame)``. Registered with a method searched from DDRS' sigma_x*, it
certifies through the command line, and the memory pass runs over its result file, without a
line of the package knowing it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.cli import main
from rddrs.core import methods, noise
from rddrs.core.methods import Method
from rddrs.core.noise import Diagonal, FullSPD, Isotropic, Smoothing
from rddrs.core.optimize import objective_and_gradient
from rddrs.core.presets import PRESETS, Search
from rddrs.core.regions import KEPT, RELABELLED, SHRUNK, Memory, Regions, disjoint
from rddrs.pipeline.memory import ABSTAINED, read_memory_rows
from rddrs.pipeline.results import memory_path, read_rows, read_sidecar, traces_dir
from rddrs.pipeline.runs import load_smoothing

torch.set_num_threads(1)
F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODEL = DATA / "models" / "mnist_cnn_sigma0.25.pt"


# -- the fifth family ----------------------------------------------------------------------


def frame_mask(d: int) -> Tensor:
    """The pixels of the outer frame of a square image of d pixels (width side // 7: 4 of 28)."""
    side = math.isqrt(d)
    if side * side != d or side < 3:
        raise RDDRSError(f"a framed law needs a square image of at least 3 x 3 pixels, got d={d}")
    width = max(1, side // 7)
    frame = torch.ones(side, side, dtype=torch.bool)
    frame[width : side - width, width : side - width] = False
    return frame.reshape(-1)


class FramedIsotropic(Smoothing):
    """``S = diag(s)``, ``s_i = sigma_frame`` on the frame and ``sigma_inside`` elsewhere;
    param (B, 2) = (sigma_inside, sigma_frame); Euclidean geometry."""

    family = "framed-isotropic"

    def __init__(self, param: Tensor, dim: int, check: bool = True):
        param = torch.as_tensor(param)
        if check and (param.dim() != 2 or param.shape[1] != 2):
            raise RDDRSError(f"a framed law's parameter must have shape (B, 2), got {tuple(param.shape)}")
        if check and not (torch.isfinite(param).all() and (param > 0).all()):
            raise RDDRSError("a framed law's scales must be finite and > 0")
        self.param, self.dim = param, int(dim)
        self.frame = frame_mask(self.dim).to(param.device)
        self.n_frame = int(self.frame.sum())
        self.n_inside = self.dim - self.n_frame

    @classmethod
    def param_shape(cls, d: int) -> tuple[int, ...]:
        return (2,)

    @classmethod
    def from_param(cls, param: Tensor, dim: int, check: bool = True) -> "FramedIsotropic":
        return cls(param, dim, check=check)

    @classmethod
    def embed(cls, law: Smoothing) -> "FramedIsotropic":
        if type(law) is cls:
            return law
        if not law.scalar:
            raise RDDRSError(f"a {law.family} law is not one of the {cls.family} family")
        return cls(law.param.detach()[:, None].expand(-1, 2).clone(), law.dim)

    def diagonal(self) -> Tensor:
        inside, frame = self.param[:, :1], self.param[:, 1:]
        return torch.where(self.frame, frame, inside)

    def _noise_factor(self) -> Tensor:
        return self.diagonal()[:, None, :]

    def log_proxy(self) -> Tensor:
        return (self.n_inside * self.param[:, 0].log() + self.n_frame * self.param[:, 1].log()) / self.dim

    def min_scale(self) -> Tensor:
        return self.param.amin(-1)

    def max_scale(self) -> Tensor:
        return self.param.amax(-1)

    def grad_proxy(self) -> Tensor:
        """``dP/dsigma_k = P n_k / (d sigma_k)``."""
        counts = torch.tensor([self.n_inside, self.n_frame], dtype=self.param.dtype, device=self.param.device)
        return self.proxy()[:, None] * counts / (self.dim * self.param.detach())

    def grad_min_scale(self) -> Tensor:
        """The indicator of the smaller scale, shared equally on a tie."""
        param = self.param.detach()
        tied = (param <= param.amin(-1, keepdim=True)).to(param.dtype)
        return tied / tied.sum(-1, keepdim=True)


#: the method that uses it: searched from DDRS' sigma_x* (its start and floor), plain ascent
FRAMED = Method("framed", "Framed DDRS", FramedIsotropic.family, True, "sgd", (), "ddrs", None)
#: its search at the smoke preset: plain ascent (Adam would move both scales alike)
SMOKE_SEARCH = Search(8, 16, 2e-2, kappa=0.5, max_step=0.2)


@pytest.fixture
def registered(monkeypatch):
    """The family, its method and its smoke search, registered for one test only."""
    noise.register(FramedIsotropic)
    try:
        methods.register(FRAMED)
        monkeypatch.setitem(PRESETS["smoke"].search, FRAMED.name, SMOKE_SEARCH)
        yield
    finally:
        if FRAMED.name in methods.METHODS:
            methods.unregister(FRAMED.name)
        noise.unregister(FramedIsotropic.family)


def _framed(b: int = 3, d: int = 100, seed: int = 0) -> FramedIsotropic:
    gen = torch.Generator().manual_seed(seed)
    return FramedIsotropic(0.2 + torch.rand(b, 2, generator=gen, dtype=F64), d)


# -- the contract, checked on the fifth family ---------------------------------------------


def test_the_framed_law_is_the_diagonal_law_of_its_scales():
    law = _framed()
    diag = Diagonal.embed(law)
    frame = frame_mask(100)
    assert int(frame.sum()) == 100 - 8 * 8 and int(frame_mask(784).sum()) == 784 - 20 * 20  # 1 and 4 pixels wide
    assert torch.equal(diag.param[:, frame], law.param[:, 1:].expand(-1, int(frame.sum())))
    assert torch.equal(diag.param[:, ~frame], law.param[:, :1].expand(-1, int((~frame).sum())))
    torch.testing.assert_close(law.proxy(), diag.proxy(), rtol=1e-12, atol=0)
    assert torch.equal(law.min_scale(), diag.min_scale()) and torch.equal(law.max_scale(), diag.max_scale())
    torch.testing.assert_close(law.matrix(), FullSPD.embed(law).matrix())
    eps = torch.randn(3, 5, 100, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(law.scale_noise(eps), diag.scale_noise(eps))
    m = torch.randn(3, 100, 2, dtype=F64)
    assert torch.equal(law.solve(m), diag.solve(m))
    assert torch.equal(law.scales(), diag.scales()) and law.axes()[0].shape == (3, 100)
    assert law.param_shape(784) == (2,) and law.with_param(law.param * 2).dim == 100
    assert not law.in_rows and not law.dense and not law.scalar and law.geometry == "euclidean"
    # a law of a family it contains is embedded; one of a larger family is a one-line error
    sigma = Isotropic(torch.tensor([0.3, 0.4], dtype=F64), 100)
    assert torch.equal(FramedIsotropic.embed(sigma).diagonal(), Diagonal.embed(sigma).param)
    with pytest.raises(RDDRSError, match="not one of"):
        FramedIsotropic.embed(diag)
    with pytest.raises(RDDRSError, match="not one of"):
        Isotropic.embed(law)


@pytest.mark.parametrize("which", ["proxy", "min_scale"])
def test_the_closed_form_gradients_match_finite_differences(which):
    law, h = _framed(), 1e-6
    grad = law.grad_proxy() if which == "proxy" else law.grad_min_scale()
    for k in range(2):
        step = torch.zeros_like(law.param)
        step[:, k] = h
        up, down = (getattr(law.with_param(law.param + s), which)() for s in (step, -step))
        torch.testing.assert_close(grad[:, k], (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


def test_the_search_gradient_of_H_matches_finite_differences():
    """H = R (P + kappa K) and its gradient with respect to (sigma_inside, sigma_frame), through
    the sampling x + S eps, on fixed draws (a smooth classifier of d = 100 inputs)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(100, 3, generator=gen, dtype=F64)

    def model(z):
        return torch.tanh(z.reshape(len(z), -1) @ w)

    x = torch.randn(2, 100, generator=gen, dtype=F64) * 0.3
    law = FramedIsotropic(torch.tensor([[0.3, 0.6], [0.5, 0.2]], dtype=F64), 100)
    eps = torch.randn(2, 2000, 100, generator=gen, dtype=F64)
    _, grad = objective_and_gradient(model, x, law, eps, kappa=0.5)
    v = torch.randn(2, 2, generator=gen, dtype=F64)
    h = 1e-6
    up = objective_and_gradient(model, x, law.with_param(law.param + h * v), eps, kappa=0.5)[0]
    down = objective_and_gradient(model, x, law.with_param(law.param - h * v), eps, kappa=0.5)[0]
    torch.testing.assert_close((grad * v).sum(1), (up - down) / (2 * h), rtol=1e-5, atol=1e-8)


def test_the_memory_treats_a_framed_law_as_its_diagonal_law():
    """The memory's decisions for framed laws are those for the same S as diag(theta), and,
    within rounding, as a dense C (the other branch of the exact geometry)."""
    d, n = 36, 40
    gen = torch.Generator().manual_seed(5)
    centres = 0.5 * torch.rand(n, d, generator=gen, dtype=F64)
    laws = FramedIsotropic(0.1 + 0.3 * torch.rand(n, 2, generator=gen, dtype=F64), d)
    gaps = 0.5 + 2 * torch.rand(n, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    framed, diagonal, dense = Memory(), Memory(), Memory()
    statuses = set()
    for i in range(n):
        law = laws[i : i + 1]
        a = framed.admit(centres[i], law, float(gaps[i]), int(labels[i]))
        assert a == diagonal.admit(centres[i], Diagonal.embed(law), float(gaps[i]), int(labels[i]))
        b = dense.admit(centres[i], FullSPD.embed(law), float(gaps[i]), int(labels[i]))
        assert (a.label, a.status) == (b.label, b.status) and a.gap == pytest.approx(b.gap, rel=1e-9)
        statuses.add(a.status)
    assert {SHRUNK, KEPT} <= statuses  # the regions met: the memory had to act
    stored = framed.regions()
    assert isinstance(stored.laws, FramedIsotropic)
    for j in range(len(stored)):  # no two stored regions of different classes meet
        others = [k for k in range(len(stored)) if framed.labels[k] != framed.labels[j] and k != j]
        if others and stored.gaps[j] > 0:
            subset = Regions(stored.centres[others], stored.laws[others], stored.gaps[others])
            assert disjoint(stored.centres[j], stored.laws[j : j + 1], float(stored.gaps[j]), subset).all()
    with pytest.raises(RDDRSError, match="one smoothing family"):
        framed.store(centres[0], Diagonal.embed(laws[0:1]), 1.0, 0)


# -- through the command line and the memory pass --------------------------------------------


def test_a_registered_family_and_method_certify_through_the_cli_and_the_memory(registered, tmp_path, capsys):
    from rddrs.studies import analysis
    from rddrs.studies.labels import label
    from rddrs.studies.study import Variant

    assert "framed" in methods.NAMES and "framed" in methods.SEARCHED and "framed" in analysis.METHODS
    out = tmp_path / "framed.tsv"
    args = [
        "certify",
        "--method",
        "framed",
        "--sigma",
        "0.25",
        "--model",
        str(MODEL),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--quiet",
        "--count",
        "3",
    ]
    assert main(args + ["--memory"]) == 0, capsys.readouterr().err
    assert "memory:" in capsys.readouterr().out
    side = read_sidecar(out)["settings"]
    assert side["method"] == "framed" and sorted(side["search"]) == ["ddrs", "framed"]
    rows = read_rows(out)
    assert sorted(rows) == [0, 1, 2]
    d, frame = 784, int(frame_mask(784).sum())
    apart = []
    for i, row in rows.items():
        with np.load(traces_dir(out) / f"{i}.npz") as trace:
            param, star = trace["param"].astype(np.float64), float(trace["sigma_star"])
            assert trace["framed"].shape == (SMOKE_SEARCH.iterations,)
        assert param.shape == (2,)
        assert param.min() >= star * (1 - 1e-6)  # floored at DDRS' sigma_x*, its start
        assert row["sigma_min"] == pytest.approx(param.min(), rel=1e-6)
        assert row["sigma_max"] == pytest.approx(param.max(), rel=1e-6)
        proxy = math.exp(((d - frame) * math.log(param[0]) + frame * math.log(param[1])) / d)
        assert row["sigma_proxy"] == pytest.approx(proxy, rel=1e-5)
        assert row["radius"] == pytest.approx(row["gap"] * row["sigma_min"], rel=1e-9, abs=1e-12)
        assert row["proxy_radius"] == pytest.approx(row["gap"] * row["sigma_proxy"], rel=1e-9, abs=1e-12)
        apart.append(abs(param[1] - param[0]) / param.min())
    assert any(row["radius"] > 0 for row in rows.values())
    assert min(apart) > 1e-3, apart  # the search moved the two scales apart from sigma_x* I
    # the laws the run certified with, read back through the family
    laws = load_smoothing(out, [0, 1, 2], d)
    assert isinstance(laws, FramedIsotropic) and laws.param.shape == (3, 2)
    # the memory pass: one row per image, radii that follow its gaps, and (a rerun) nothing to redo
    path = memory_path(out)
    memory_rows = read_memory_rows(path)
    assert [r["idx"] for r in memory_rows] == [0, 1, 2]
    for r in memory_rows:
        assert r["memory"] in (KEPT, SHRUNK, RELABELLED, ABSTAINED)
        assert r["radius"] == pytest.approx(r["gap"] * r["sigma_min"], rel=1e-9, abs=1e-12)
        assert r["gap"] <= rows[r["idx"]]["gap"] + 1e-12
    first = path.read_text()
    assert main(["memory", str(out), "--data", str(DATA), "--quiet"]) == 0
    assert path.read_text() == first
    path.unlink()
    assert main(["memory", str(out), "--data", str(DATA), "--quiet"]) == 0  # from scratch: the same
    assert path.read_text() == first
    # its words: a Euclidean family's Adam is plain Adam
    assert label(Variant("framed_adam", "framed", {"step": "adam"})) == "Framed DDRS, Adam"
    assert label(Variant("rddrs_adam", "rddrs", {"step": "adam"})) == "RDDRS, Riemannian Adam"


def test_registration_is_checked_and_undone(registered):
    with pytest.raises(RDDRSError, match="exists already"):
        noise.register(FramedIsotropic)
    with pytest.raises(RDDRSError, match="exists already"):
        methods.register(FRAMED)
    with pytest.raises(RDDRSError, match="unknown method"):
        methods.register(Method("lost", "Lost", "isotropic", True, "sgd", (), "nowhere", None))
    with pytest.raises(RDDRSError, match="not a registered"):
        methods.unregister("rddrs")
    with pytest.raises(RDDRSError, match="not a registered"):
        noise.unregister("full")
    assert noise.from_param("framed-isotropic", torch.ones(1, 2), 784).min_scale().item() == 1.0


def test_without_registration_the_four_methods_remain():
    assert tuple(methods.NAMES) == ("rs", "ddrs", "ancer", "rddrs") == methods.NAMES
    assert tuple(methods.SEARCHED) == ("ddrs", "ancer", "rddrs")
    assert sorted(noise.FAMILIES) == ["diagonal", "full", "isotropic"]
    with pytest.raises(RDDRSError, match="unknown smoothing family"):
        noise.from_param("framed-isotropic", torch.ones(1, 2), 784)


# -- the package asks no family which it is --------------------------------------------------

#: the names of the fifth family and its method, which no file of the package may hold
FIFTH = ("FramedIsotropic", "framed-isotropic", "Framed DDRS")


def test_the_fifth_family_lives_in_at_most_three_test_files():
    holders = sorted(
        {
            path
            for path in [*ROOT.glob("src/**/*"), *ROOT.glob("tests/**/*.py")]
            if path.is_file()
            and path.suffix in (".py", ".md", ".toml", ".txt", ".json", ".cfg")
            and any(name in path.read_text(errors="replace") for name in FIFTH)
        }
    )
    assert holders, "the fifth family is here"
    assert all(path.parent == ROOT / "tests" for path in holders), holders
    assert len(holders) <= 3 and Path(__file__).resolve() in holders


#: what asks a law which family it is: the family constants, comparisons of family names or
#: classes, a dict dispatched on a family name, and the helpers of a closed set of families
WHICH_FAMILY = re.compile(
    r"\b(ISOTROPIC|DIAGONAL|FULL)\b"
    r"|\bfamily\s*(==|!=)|\}\[[^\]]*\bfamily\]"
    r"|isinstance\([^)]*\b(Isotropic|Diagonal|FullSPD)\b"
    r"|type\([^)]*\)\s*(is|==|is not|!=)\s*(Isotropic|Diagonal|FullSPD)\b"
    r"|\b(PARAM_AXES|as_full|as_diagonal)\b"
)


def test_no_module_outside_the_family_module_asks_which_family_a_law_is():
    package = ROOT / "src" / "rddrs"
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative == "core/noise.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if relative == "core/methods.py" and not re.search(r"==|!=|isinstance|PARAM_AXES", code):
                continue  # it names the families of the four methods
            if WHICH_FAMILY.search(code):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
