"""Chapter 7's studies (rddrs.studies.budget) are well-formed data, and their measures compute what they say."""

import math

import pytest
import torch

from rddrs.core import presets
from rddrs.core.methods import METHODS
from rddrs.pipeline.models import MnistCNN
from rddrs.pipeline.settings import make_settings
from rddrs.studies import budget

torch.set_num_threads(1)

STUDIES = {
    "tuning": budget.tuning_study,
    "variants": budget.variants_study,
    "step_sizes": budget.step_size_study,
    "frontier": budget.frontier_study,
    "best": lambda p: budget.best_study(p, 0.12),
    "clamped": budget.clamped_study,
    "diagonal": budget.diagonal_study,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    torch.save({"state_dict": MnistCNN().state_dict(), "arch": "MnistCNN"}, path)
    return path


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_variant_is_a_valid_run(checkpoint, preset, name):
    study = STUDIES[name](preset)
    names = [v.name for v in study.variants]
    assert len(names) == len(set(names)), "variant names must be unique (they name the files)"
    for variant in study.variants:
        make_settings(variant.method, 0.25, checkpoint, preset, search=variant.search or None)
        if variant.start is not None:
            start = study.variant(variant.start)
            assert start.method in METHODS[variant.method].starts


def test_chosen_step_sizes_are_candidates_and_best_variants_exist():
    for pair, chosen in budget.STEP_SIZES.items():
        assert chosen in budget.CANDIDATES[pair], pair
    variants = {v.name for v in budget.variants_study("cpu").variants}
    assert set(budget.BEST.values()) <= variants


def test_the_diagonal_study_differs_from_rddrs_best_only_by_the_restriction():
    study = budget.diagonal_study("cpu")
    grid = budget.variants_study("cpu")
    kept = [v for v in study.variants if v.search.get("diagonal")]
    assert len(kept) == 2 and study.variant(budget.BEST["rddrs"]) == grid.variant(budget.BEST["rddrs"])
    for variant in kept:
        free = study.variant(variant.name.removesuffix("_diagonal"))
        assert free == grid.variant(free.name)  # the grid's own run, which the study reproduces
        assert {**variant.search, "diagonal": False} == {
            **free.search,
            "diagonal": False,
        } and variant.start == free.start
        assert budget.evaluations(study, variant, "cpu") == budget.evaluations(study, free, "cpu")


def test_evaluations_count_the_start_too():
    study = budget.variants_study("cpu")
    cpu = presets.PRESETS["cpu"].search
    ddrs = cpu["ddrs"].iterations * cpu["ddrs"].samples
    assert budget.evaluations(study, study.variant("ddrs_soft_sgd"), "cpu") == ddrs
    rddrs = cpu["rddrs"].iterations * cpu["rddrs"].samples
    assert budget.evaluations(study, study.variant("rddrs_soft_sgd"), "cpu") == rddrs + ddrs
    ancer = cpu["ancer"].iterations * cpu["ancer"].samples
    assert (
        budget.evaluations(study, study.variant("rddrs_soft_sgd_from_ancer_soft_adam"), "cpu") == rddrs + ancer + ddrs
    )


def test_samples_for_inverts_the_square_root_law():
    rows = [{"scheme": "plain", "samples": m, "error": 3.0 / math.sqrt(m)} for m in (100, 400, 1600)]
    assert budget.samples_for(rows, 0.1)["plain"] == pytest.approx(900.0)
    assert budget.samples_for(rows, 0.3)["plain"] == pytest.approx(100.0)
    noisy = [{"scheme": "plain", "samples": m, "error": 3.0 * math.sqrt(1 / m + 1 / 10_000)} for m in (100, 400, 1600)]
    assert budget.samples_for(noisy, 0.1, reference=10_000)["plain"] == pytest.approx(900.0)
    assert budget.samples_for(noisy, 0.1)["plain"] > 900.0  # the reference's own noise, ignored, inflates it


def test_gradient_error_falls_with_the_number_of_draws():
    torch.manual_seed(0)
    model = MnistCNN().eval().requires_grad_(False)
    x = torch.rand(1, 1, 28, 28)
    rows = budget.gradient_quality(
        model, x, torch.tensor([0.25]), [0], sizes=(16, 256), reference=4096, repeats=3, chunk=1024
    )
    error = {(r["samples"], r["scheme"]): r["error"] for r in rows}
    assert set(error) == {(m, s) for m in (16, 256) for s in ("plain", "antithetic", "control variate")}
    for scheme in ("plain", "antithetic", "control variate"):
        assert error[(256, scheme)] < error[(16, scheme)]  # about 4x smaller: 1 / sqrt(16)
    assert all(0 < e for e in error.values())


def test_diagonal_split_finds_a_diagonal_gradient_whose_noise_is_mostly_off_diagonal():
    """A classifier that reads one coordinate: at C = sigma I the gradient of H is diagonal (the
    off-diagonal entries E[psi'(y_0) eps_j] vanish, eps_j independent of y_0), while every entry
    (0, j) of an estimate carries noise, so the diagonal holds about 1/d of the error."""
    d = 24
    weights = torch.zeros(2, d, dtype=torch.float64)
    weights[0, 0], weights[1, 0] = 3.0, -3.0

    def model(z):
        return z.reshape(len(z), -1) @ weights.T

    x = torch.full((1, d), 0.3, dtype=torch.float64)
    (row,) = budget.diagonal_split(model, x, torch.tensor([0.5], dtype=torch.float64), [0], samples=4000, repeats=12)
    assert row["signal_share"] == pytest.approx(1.0, abs=0.05)
    assert row["noise_share"] < 3 / d and row["noise_to_signal"] > 0


def test_the_pipeline_parts_change_one_part_of_the_authors_pipeline_each(checkpoint):
    pipeline, parts = budget.clamped_study("paper"), budget.pipeline_parts_study("paper")
    assert parts.name == pipeline.name and parts.count <= pipeline.count  # its runs are the pipeline's files
    own = {v.name: v for v in pipeline.variants}
    written = own["rddrs_clamped"]
    changed = [v for v in parts.variants if v.name not in own]
    assert all(v == own[v.name] for v in parts.variants if v.name in own) and len(changed) == 2
    for variant in changed:
        differ = {
            k for k in written.search.keys() | variant.search.keys() if written.search.get(k) != variant.search.get(k)
        }
        assert variant.start == written.start and len(differ) == 1, (variant.name, differ)
        make_settings("rddrs", 0.25, checkpoint, "paper", search=variant.search)
    assert not budget.pipeline_parts_study("cpu").variants and not budget.pipeline_parts_study("smoke").variants
