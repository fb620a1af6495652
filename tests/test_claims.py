"""The studies of chapter 7: the new search options, the isotropy measure, the driver."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import rddrs.pipeline.runs
from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.noise import Diagonal, FullSPD, Isotropic, NoiseSource
from rddrs.core.optimize import find_smoothing, objective_and_gradient, search
from rddrs.core.presets import Search
from rddrs.pipeline.models import MnistCNN
from rddrs.pipeline.results import model_path, read_rows, result_path, traces_dir
from rddrs.studies import analysis, budgets, claims
from rddrs.studies.study import Study, Variant, VariantRun, run_study

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


# -- antithetic pairs and replicate streams -------------------------------------------------


def _documented_stream(seed: int, stage: int, index: int, rows: int, d: int, *extra: int) -> torch.Tensor:
    """The first rows of a stream, generated from its documented key independently of NoiseSource."""
    key = np.random.SeedSequence([seed, stage, index, *extra])
    gen = torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return torch.randn(NoiseSource.BLOCK, d, generator=gen, dtype=F64)[:rows]


def test_antithetic_draws_are_exact_pairs_from_half_the_stream():
    d, m = 5, 12
    u = spd.random_orthogonal(d, seed=3)
    for rotation in (None, u):
        src = NoiseSource(4, NoiseSource.OPTIMIZE, rotation=rotation)
        eps = src.draw([2, 9], m, d, F64, antithetic=True)
        assert eps.shape == (2, m, d)
        assert torch.equal(eps[:, m // 2 :], -eps[:, : m // 2])
        # the first half is the plain stream's first m/2 rows, and the stream moved on by m/2 rows
        plain = NoiseSource(4, NoiseSource.OPTIMIZE, rotation=rotation).draw([2, 9], m, d, F64)
        torch.testing.assert_close(eps[:, : m // 2], plain[:, : m // 2], rtol=0, atol=0)
        torch.testing.assert_close(src.draw([2, 9], m // 2, d, F64), plain[:, m // 2 :], rtol=0, atol=0)
    with pytest.raises(RDDRSError, match="even"):
        NoiseSource(0, NoiseSource.OPTIMIZE).draw([0], 7, d, antithetic=True)
    with pytest.raises(RDDRSError, match="even"):
        Search(10, 7, 0.1, antithetic=True)


def test_default_stream_is_the_documented_key_and_repeat_gives_another():
    d, m = 3, 10
    stage = NoiseSource.STAGES[NoiseSource.OPTIMIZE]
    for repeat, extra in ((0, ()), (2, (2,))):
        got = NoiseSource(7, NoiseSource.OPTIMIZE, repeat=repeat).draw([5], m, d, F64)[0]
        torch.testing.assert_close(got, _documented_stream(7, stage, 5, m, d, *extra), rtol=0, atol=0)
    assert not torch.allclose(
        NoiseSource(7, NoiseSource.OPTIMIZE, repeat=1).draw([5], m, d, F64),
        NoiseSource(7, NoiseSource.OPTIMIZE).draw([5], m, d, F64),
    )
    with pytest.raises(RDDRSError, match="repeat"):
        NoiseSource(0, NoiseSource.OPTIMIZE, repeat=-1)
    with pytest.raises(RDDRSError, match="repeat"):
        Search(10, 8, 0.1, repeat=-1)


def test_defaults_keep_the_searches_of_before():
    """Default options: floor on, plain draws, the original optimisation stream; the first
    objective of a search is reproduced from draws of the documented key."""
    s = Search(3, 16, 0.05, kappa=0.5)
    assert (s.floor, s.antithetic, s.repeat) == (True, False, 0)
    model = _smooth_model(4)
    x = torch.tensor([[0.3, -0.2, 0.1, 0.4], [0.0, 0.5, -0.3, 0.2]], dtype=F64)
    init = Isotropic(torch.tensor([0.3, 0.4], dtype=F64), 4).as_full()
    found = search(model, x, init, [11, 12], s, 0.3, seed=5)
    stage = NoiseSource.STAGES[NoiseSource.OPTIMIZE]
    eps = torch.stack([_documented_stream(5, stage, i, 16, 4) for i in (11, 12)])
    first, _ = objective_and_gradient(model, x, init.floor(0.3), eps, kappa=0.5)
    np.testing.assert_allclose(found.trace[:, 0], first.numpy(), rtol=1e-12)
    # another replicate changes the search's noise, hence its trace after the shared start
    other = search(model, x, init, [11, 12], replace(s, repeat=1), 0.3, seed=5)
    assert not np.allclose(other.trace[:, 0], found.trace[:, 0])


def _smooth_model(d: int, k: int = 3):
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(8, d, generator=g, dtype=F64), torch.randn(k, 8, generator=g, dtype=F64)
    return lambda z: torch.tanh(z.reshape(len(z), -1) @ w1.T) @ w2.T


class Probit(torch.nn.Module):
    """Two classes with probabilities ``Phi(w.y), Phi(-w.y)`` (as log-probabilities), so that
    under ``y = x + sigma eps``: ``G_A = Phi(w.x / sqrt(1 + sigma^2 |w|^2))``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, y):
        z = y.reshape(len(y), -1) @ self.w
        return torch.stack([torch.special.log_ndtr(z), torch.special.log_ndtr(-z)], -1)


def test_antithetic_estimates_have_the_plain_mean_and_the_closed_form():
    """H = R sigma with R = 2 Phi^-1(G_A) = 2 a / sqrt(1 + sigma^2 b) (a = w.x, b = |w|^2):
    the means over many independent estimates, plain or antithetic, match it and its
    derivative in sigma; the antithetic estimates vary less (Phi is monotone)."""
    d, batch, m, sigma = 3, 400, 256, 0.5
    w = torch.tensor([1.0, -0.5, 0.8], dtype=F64)
    x = torch.tensor([0.4, 0.1, 0.2], dtype=F64)
    a, b = float(w @ x), float(w @ w)
    value = 2 * a / math.sqrt(1 + sigma**2 * b) * sigma
    slope = 2 * a / math.sqrt(1 + sigma**2 * b) - 2 * a * sigma**2 * b / (1 + sigma**2 * b) ** 1.5
    law = Isotropic(torch.full((batch,), sigma, dtype=F64), d)
    xs = x.expand(batch, d)
    estimates = {}
    for antithetic in (False, True):
        eps = NoiseSource(0, NoiseSource.OPTIMIZE).draw(range(batch), m, d, F64, antithetic=antithetic)
        h, grad = objective_and_gradient(Probit(w), xs, law, eps, kappa=0.0)
        estimates[antithetic] = (h.numpy(), grad.numpy())
    for h, grad in estimates.values():
        for sample, truth in ((h, value), (grad, slope)):
            se = sample.std(ddof=1) / math.sqrt(batch)
            assert abs(sample.mean() - truth) < 4 * se + 2e-3 * abs(truth)
    for k in range(2):  # plain and antithetic means agree with each other too
        plain, pairs = estimates[False][k], estimates[True][k]
        se = math.hypot(plain.std(ddof=1), pairs.std(ddof=1)) / math.sqrt(batch)
        assert abs(plain.mean() - pairs.mean()) < 4 * se
        assert pairs.std() < 0.8 * plain.std()


# -- the floor option ------------------------------------------------------------------------


class Linear(torch.nn.Module):
    """Logits ``(w.y, -w.y)``: only the direction w matters for the classification."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, y):
        z = y.reshape(len(y), -1) @ self.w
        return torch.stack([z, -z], -1)


@pytest.mark.parametrize("method", ["ancer", "rddrs"])
def test_without_the_floor_scales_go_below_sigma_star(method):
    """Shrinking the noise along w raises the gap while the other scales raise the volume: with
    the floor lambda_min stays at sigma_x*, without it the search goes below."""
    w = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64)
    x = torch.tensor([[0.3, 0.0, 0.1, -0.2]], dtype=F64)
    star = torch.tensor([0.4], dtype=F64)
    step = {"ancer": Search(40, 64, 0.02, kappa=0.0, step="adam"), "rddrs": Search(40, 64, 0.5, max_step=0.1)}[method]
    scales = {}
    for floor in (True, False):
        law, _ = find_smoothing(
            method, Linear(w), x, [0], 0.4, seed=0, sigma_star=star, settings={method: replace(step, floor=floor)}
        )
        assert isinstance(law, Diagonal if method == "ancer" else FullSPD)
        scales[floor] = float(law.min_scale()[0])
    assert scales[True] >= 0.4 * (1 - 1e-9)
    assert scales[False] < 0.9 * 0.4


# -- the isotropy measure --------------------------------------------------------------------


def test_isotropy_split_of_a_multiple_of_the_identity():
    d = 5
    eye = torch.eye(d, dtype=F64).expand(2, d, d)
    split = claims.isotropy_split(torch.stack([0.7 * eye[0], 2.0 * eye[1]]), [0.7, 0.5])
    np.testing.assert_allclose(split["anisotropic"], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(split["relative"], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(split["total"], [0.0, math.sqrt(d) * math.log(4.0)], rtol=1e-12)


def test_isotropy_split_of_a_known_spectrum():
    """log w = (0, 1, 2) from start 1: anisotropic sqrt(2), isotropic sqrt(3), total sqrt(5)."""
    w = np.exp([[0.0, 1.0, 2.0]])
    split = claims.isotropy_split(w, 1.0)
    np.testing.assert_allclose(
        [split[k][0] for k in ("anisotropic", "isotropic", "total", "relative")],
        [math.sqrt(2), math.sqrt(3), math.sqrt(5), math.sqrt(2 / 5)],
        rtol=1e-12,
    )


def test_isotropy_split_is_invariant_and_matches_brute_force_distances():
    d = 6
    g = torch.Generator().manual_seed(0)
    w = torch.exp(torch.randn(3, d, generator=g, dtype=F64))
    q = torch.stack([spd.random_orthogonal(d, seed=s) for s in range(3)])
    c = spd.from_eig(w, q)  # Q diag(w) Q^T
    start = np.array([0.5, 1.0, 2.0])
    from_matrices, from_eigenvalues = claims.isotropy_split(c, start), claims.isotropy_split(w, start)
    for key in from_matrices:
        np.testing.assert_allclose(from_matrices[key], from_eigenvalues[key], rtol=1e-10)
    eye = torch.eye(d, dtype=F64)
    for i, matrix in enumerate(c):  # the library's general distance, minimised over t numerically
        best = minimize_scalar(
            lambda s, m=matrix: float(spd.distance(m, math.exp(s) * eye)),
            bounds=(-5, 5),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert best.fun == pytest.approx(from_matrices["anisotropic"][i], rel=1e-6)
        assert float(spd.distance(matrix, start[i] * eye)) == pytest.approx(from_matrices["total"][i], rel=1e-10)
    with pytest.raises(RDDRSError, match="positive"):
        claims.isotropy_split(np.array([[1.0, -1.0]]), 1.0)


# -- summaries on made-up runs ---------------------------------------------------------------


def _fake_run(name, method, proxy, correct, search=None, trace=None, seconds=1.0):
    proxy, correct = np.asarray(proxy, dtype=float), np.asarray(correct)
    n = len(proxy)
    res = analysis.Results(
        path=Path(f"{name}.tsv"),
        idx=np.arange(n),
        label=np.zeros(n, int),
        predict=np.where(correct == 1, 0, -1),
        correct=correct,
        gap=proxy,
        radius=0.5 * proxy,
        proxy_radius=proxy,
        sigma_min=np.full(n, 0.25),
        seconds=np.full(n, seconds),
    )
    trace = np.zeros((n, 3)) if trace is None else np.asarray(trace, dtype=float)
    return VariantRun(
        Variant(name, method, search or {}),
        Path(f"{name}.tsv"),
        res,
        {"spectrum": np.full((n, 2), 0.25, dtype=np.float32), "trace": trace, "sigma_star": np.full(n, 0.25)},
    )


def test_rotation_table_pairs_images_and_zeroes_uncertified_ones():
    runs = {}
    for m in ("rs", "ddrs", "ancer", "rddrs"):
        runs[m] = _fake_run(m, m, [1.0, 2.0, 3.0], [1, 1, 1])
        runs[f"{m}_rotated"] = _fake_run(m, m, [1.0, 1.0, 9.0], [1, 1, 0])  # the 9 abstains: counts 0
    rows = claims.rotation_table(runs, radii=(0.5, 1.5))
    assert [r["method"] for r in rows] == ["rs", "ddrs", "ancer", "rddrs"]
    row = rows[0]
    assert row["mean_original"] == pytest.approx(2.0) and row["mean_rotated"] == pytest.approx(2 / 3)
    assert row["median_rotated"] == pytest.approx(1.0)
    np.testing.assert_allclose(row["ca_original"], [1.0, 2 / 3])
    np.testing.assert_allclose(row["ca_rotated"], [2 / 3, 0.0])
    diff = np.array([0.0, -1.0, -3.0])
    assert row["difference"] == pytest.approx(diff.mean())
    assert row["se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(3))


def test_samples_table_spreads_over_repeats():
    runs = {}
    values = {(8, False): [[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]], (8, True): [[2.0, 2.0]] * 3}
    for (m, anti), reps in values.items():
        for r, proxy in enumerate(reps):
            name = f"m{m}_{anti}_r{r}"
            runs[name] = _fake_run(
                name,
                "rddrs",
                proxy,
                [1, 1],
                {"samples": m, "antithetic": anti, "repeat": r},
                trace=[[0, 0, r], [0, 0, 2 * r]],
                seconds=2.0,
            )
    rows = claims.samples_table(runs)
    assert [(r["samples"], r["antithetic"], r["repeats"], r["images"]) for r in rows] == [
        (8, False, 3, 2),
        (8, True, 3, 2),
    ]
    assert rows[0]["proxy_std"] == pytest.approx(np.mean([np.std([1, 3, 2], ddof=1), 0.0]))
    assert rows[0]["objective_std"] == pytest.approx(np.mean([np.std([0, 1, 2], ddof=1), np.std([0, 2, 4], ddof=1)]))
    assert rows[1]["proxy_std"] == 0.0 and rows[0]["seconds"] == 2.0


# -- the driver at the smoke preset ----------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained CNN in the place of the sigma = 0.25 classifier (bookkeeping does not
    depend on training)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    torch.save({"state_dict": MnistCNN().state_dict(), "arch": "MnistCNN"}, model_path(0.25, folder))
    return folder


def test_studies_follow_the_budget():
    found = claims.studies("cpu")
    budget = budgets.of("cpu").claims
    assert set(found) == {"rotation", "kappa", "floor", "samples", "isotropy"}
    assert len(found["kappa"].variants) == len(budget.kappas)
    assert len(found["samples"].variants) == len(budget.sample_sizes) * 2 * budget.repeats
    assert found["samples"].count == budget.sample_inputs and found["floor"].count == budget.count
    assert claims.studies("smoke", count=5)["rotation"].count == 5
    rotated = [v for v in found["rotation"].variants if v.rotate is not None]
    assert sorted(v.method for v in rotated) == ["ancer", "ddrs", "rddrs", "rs"]
    with pytest.raises(RDDRSError, match="preset"):
        claims.studies("laptop")


def test_driver_writes_resumes_and_summarises(models, tmp_path, monkeypatch):
    study = claims.studies("smoke", count=2)["floor"]
    results = tmp_path / "results"
    runs = run_study(study, 0.25, "smoke", results, data=ROOT / "data", models=models)
    # the floored variant is the preset's own: the standard run, with its DDRS start beside it
    assert runs["floor"].path == result_path(results, "rddrs", 0.25)
    assert runs["no_floor"].path == results / "claims" / "floor" / "no_floor.tsv"
    assert result_path(results, "ddrs", 0.25).exists()
    for name, run in runs.items():
        assert sorted(read_rows(run.path)) == [0, 1]
        assert (results / "claims" / "floor" / f"{name}.digest.npz").exists()
        assert run.spectrum.shape == (2, 784) and run.trace.shape == (2, 5)
        np.testing.assert_allclose(run.spectrum[:, 0], run.results.sigma_min, rtol=1e-5)
    ddrs = read_rows(result_path(results, "ddrs", 0.25))
    np.testing.assert_allclose(runs["floor"].sigma_star, [ddrs[i]["sigma_min"] for i in (0, 1)])
    assert (runs["floor"].spectrum[:, 0] >= runs["floor"].sigma_star * (1 - 1e-5)).all()

    # resuming computes nothing, and the digests alone suffice once the traces are gone
    monkeypatch.setattr(rddrs.pipeline.runs, "find_smoothing", lambda *a, **k: pytest.fail("recomputed a row"))
    for run in runs.values():
        for trace in traces_dir(run.path).glob("*.npz"):
            trace.unlink()
    again = run_study(study, 0.25, "smoke", results, data=ROOT / "data", models=models)
    for name in runs:
        np.testing.assert_array_equal(again[name].spectrum, runs[name].spectrum)
        np.testing.assert_array_equal(again[name].results.proxy_radius, runs[name].results.proxy_radius)

    rows = claims.distribution_table(again, "floor")
    assert [r["variant"] for r in rows] == ["floor", "no_floor"]
    assert rows[0]["proxy_difference"] == (0.0, 0.0)
    assert all(len(r["proxy_q"]) == 3 and r["min_scale_ratio"].shape == (2,) for r in rows)
    iso = claims.isotropy_table(again)
    assert len(iso) == 2 and all(0 <= r["relative"] <= 1 for r in iso)


def test_a_diverging_variant_is_read_with_its_rows_and_counted(models, tmp_path, monkeypatch):
    """A search that overflows on every image still gives rows (certified with the last finite
    law), counted by ``results.diverged``; the variant that starts from it is computed; a rerun
    computes nothing."""
    study = Study(
        "wild",
        2,
        (
            Variant("ddrs_wild", "ddrs", {"lr": 1e30, "max_step": 0}),
            Variant("rddrs_after", "rddrs", start="ddrs_wild"),
            Variant("rs", "rs"),
        ),
    )
    results = tmp_path / "results"
    runs = run_study(study, 0.25, "smoke", results, data=ROOT / "data", models=models)
    assert runs["ddrs_wild"].results.diverged == 2 and runs["rddrs_after"].results.diverged == 0
    assert list(runs["rs"].results.search) == ["-", "-"]
    assert runs["rs"].path == result_path(results, "rs", 0.25)
    assert not list((results / "claims" / "wild").glob("*.diverged.json"))
    monkeypatch.setattr(rddrs.pipeline.runs, "find_smoothing", lambda *a, **k: pytest.fail("recomputed"))
    again = run_study(study, 0.25, "smoke", results, data=ROOT / "data", models=models)
    assert again["ddrs_wild"].results.diverged == 2
