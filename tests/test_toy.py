"""The 2D toy problem: data, MLP, drawn regions, and the rotation property of the three searches."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from rddrs import RDDRSError
from rddrs.core.presets import Search
from rddrs.studies import toy
from rddrs.studies.analysis import METHOD_LABELS
from rddrs.studies.display import METHOD_STYLES

torch.set_num_threads(1)

SIGMA = 0.15
# small searches and counts: enough for the searches to move, a fraction of a second each
SMALL = {
    "ddrs": Search(iterations=10, samples=64, lr=0.01, keep_best_every=5, max_step=0.1),
    "ancer": Search(iterations=20, samples=64, lr=0.02, kappa=2.0, step="adam"),
    "rddrs": Search(iterations=20, samples=64, lr=1.0, kappa=1e-6, max_step=0.1),
}
COUNTS = {"n0": 50, "n": 2000, "alpha": 0.001}


@pytest.fixture(scope="module")
def model():
    return toy.train_mlp(toy.make_dataset(), SIGMA, steps=200)


@pytest.fixture(scope="module")
def original_and_turned(model):
    points = toy.blob_centres()
    return [toy.certified_regions(model, points, SIGMA, angle, settings=SMALL, **COUNTS) for angle in (0.0, 45.0)]


def rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


# -- data ---------------------------------------------------------------------------------------


def test_dataset_shapes_and_classes():
    data = toy.make_dataset(n_per_class=50)
    assert data.x.shape == (150, 2) and data.y.shape == (150,)
    assert data.x.dtype == torch.float64 and torch.isfinite(data.x).all()
    assert torch.bincount(data.y).tolist() == [50, 50, 50]


def test_dataset_is_fixed_by_its_seed():
    a, b, c = toy.make_dataset(seed=3), toy.make_dataset(seed=3), toy.make_dataset(seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.allclose(a.x, c.x)


def test_rotation_matrix_is_the_counter_clockwise_rotation():
    u = toy.rotation_matrix(90.0).numpy()
    np.testing.assert_allclose(u @ [1.0, 0.0], [0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(toy.rotation_matrix(30.0).numpy(), rotation(30.0), atol=1e-15)


def test_turning_the_data_is_an_isometry():
    plain, turned = toy.make_dataset(), toy.make_dataset(angle=45.0)
    np.testing.assert_allclose(turned.x.numpy(), plain.x.numpy() @ rotation(45.0).T, atol=1e-12)
    assert torch.equal(turned.y, plain.y)

    def distances(x):
        return (x[:, None] - x[None]).norm(dim=-1).numpy()

    np.testing.assert_allclose(distances(turned.x), distances(plain.x), atol=1e-12)
    np.testing.assert_allclose(
        toy.blob_centres(45.0).numpy(), toy.blob_centres().numpy() @ rotation(45.0).T, atol=1e-15
    )


def test_the_blobs_are_oblique():
    """Each blob's long axis (top eigenvector of its sample covariance) points at TILT degrees."""
    data = toy.make_dataset(n_per_class=2000)
    for label in (0, 1):
        points = data.x[data.y == label].numpy()
        w, v = np.linalg.eigh(np.cov(points.T))
        angle = math.degrees(math.atan2(v[1, -1], v[0, -1])) % 180
        assert abs(angle - toy.TILT) < 2.0
        assert w[-1] > 10 * w[0]
    assert 5.0 < toy.TILT < 40.0  # far from both axes, and 45 degrees more is far from them too


def test_bad_inputs_raise_one_line_errors(model):
    with pytest.raises(RDDRSError, match="n_per_class"):
        toy.make_dataset(n_per_class=0)
    with pytest.raises(RDDRSError, match="sigma"):
        toy.train_mlp(toy.make_dataset(n_per_class=5), -0.1, steps=1)
    with pytest.raises(RDDRSError, match=r"shape \(B, 2\)"):
        toy.certified_regions(model, torch.zeros(3), SIGMA)
    with pytest.raises(RDDRSError, match="unknown method"):
        toy.certified_regions(model, toy.blob_centres(), SIGMA, methods=("rs",))


# -- the classifier -----------------------------------------------------------------------------


def test_mlp_learns_the_problem(model):
    held_out = toy.make_dataset(seed=1)
    assert toy.accuracy(model, held_out) > 0.97
    assert not any(p.requires_grad for p in model.parameters())
    # the certified points are the blobs' centres and are classified as their blob
    assert model(toy.blob_centres()).argmax(-1).tolist() == [0, 1]


def test_mlp_training_is_deterministic():
    data = toy.make_dataset(n_per_class=20)
    a, b = (toy.train_mlp(data, SIGMA, steps=5, seed=2) for _ in range(2))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- region geometry ----------------------------------------------------------------------------


def make_region(angle=25.0, semi=(0.6, 0.2), gap=1.7, centre=(0.3, -0.4)) -> toy.Region:
    v = rotation(angle)
    scale = v @ np.diag(semi) @ v.T
    w = np.linalg.eigvalsh(scale)
    return toy.Region("rddrs", np.array(centre), scale, gap, 0, gap * math.sqrt(w[0] * w[1]), gap * w[0])


def test_region_axes_are_the_singular_pairs_of_r_times_s():
    region = make_region()
    semi_axes, directions = region.axes
    np.testing.assert_allclose(semi_axes, [1.7 * 0.6, 1.7 * 0.2], rtol=1e-12)
    v = rotation(25.0)
    np.testing.assert_allclose(np.abs(directions.T @ v), np.eye(2), atol=1e-12)  # up to sign
    assert region.axis_angle == pytest.approx(25.0, abs=1e-9)


def test_drawn_ellipse_is_the_certified_region():
    region = make_region(angle=130.0)
    patch = region.patch()
    assert (patch.width, patch.height) == pytest.approx((2 * 1.7 * 0.6, 2 * 1.7 * 0.2), rel=1e-12)
    t = np.linspace(0, 2 * np.pi, 50)
    drawn = patch.get_patch_transform().transform(np.stack([np.cos(t), np.sin(t)], 1))
    for y in (drawn, region.boundary(50)):
        norms = np.linalg.norm(np.linalg.solve(region.scale, (y - region.centre).T), axis=0)
        np.testing.assert_allclose(norms, region.gap, rtol=1e-9)
    assert region.axis_angle == pytest.approx(130.0, abs=1e-9)


def test_isotropic_scale_has_no_principal_axis():
    region = toy.Region("ddrs", np.zeros(2), 0.3 * np.eye(2), 1.0, 0, 0.3, 0.3)
    assert math.isnan(region.axis_angle)
    np.testing.assert_allclose(region.axes[0], [0.3, 0.3], rtol=1e-12)  # a circle: equal semi-axes


def test_pipeline_regions_match_their_certificates(original_and_turned):
    original, _ = original_and_turned
    assert list(original) == list(toy.SMOOTHED_METHODS)
    for method, regions in original.items():
        for label, region in enumerate(regions):
            w = np.linalg.eigvalsh(region.scale)
            assert region.predict == label  # each blob's centre is certified as its blob
            assert region.gap > 0
            assert region.proxy_radius == pytest.approx(region.gap * math.sqrt(w[0] * w[1]), rel=1e-9)
            assert region.l2_radius == pytest.approx(region.gap * w[0], rel=1e-9)
        if method == "ancer":
            assert all(r.scale[0, 1] == 0 for r in regions)
    # ANCER and RDDRS start from, and keep above, DDRS' sigma_x*
    for i, ddrs in enumerate(original["ddrs"]):
        sigma_star = ddrs.scale[0, 0]
        for method in ("ancer", "rddrs"):
            assert np.linalg.eigvalsh(original[method][i].scale)[0] >= sigma_star * (1 - 1e-9)
    # and in two dimensions RDDRS does lean along the blobs
    assert all(abs(r.axis_angle - toy.TILT) < 10 for r in original["rddrs"])


# -- rotation -----------------------------------------------------------------------------------


def test_ddrs_and_rddrs_are_invariant_and_ancer_is_not(original_and_turned):
    """Composed classifier f(U^T .), inputs U x, draws U eps: DDRS' and RDDRS' certificates are
    those of the original problem to float precision (RDDRS' matrix turns: U S U^T); ANCER's
    proxy radii change."""
    original, turned = original_and_turned
    u = rotation(45.0)
    for method in ("ddrs", "rddrs"):
        for before, after in zip(original[method], turned[method]):
            assert after.proxy_radius == pytest.approx(before.proxy_radius, rel=1e-9, abs=0)
            assert after.gap == pytest.approx(before.gap, rel=1e-9, abs=0)
            np.testing.assert_allclose(after.scale, u @ before.scale @ u.T, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(after.centre, u @ before.centre, atol=1e-12)
    change = [abs(a.proxy_radius - b.proxy_radius) / b.proxy_radius for b, a in zip(original["ancer"], turned["ancer"])]
    assert max(change) > 1e-2  # seven orders of magnitude above what the invariant ones allow
    assert all(r.scale[0, 1] == 0 for r in turned["ancer"])  # still axis-aligned after the turn


def test_rotation_summary_reports_the_turn_of_the_axes(original_and_turned):
    original, turned = original_and_turned
    rows = toy.rotation_summary(original, turned, 45.0)
    assert [(r["point"], r["method"]) for r in rows] == [(p, m) for m in toy.SMOOTHED_METHODS for p in (0, 1)]
    for row in rows:
        if row["method"] == "rddrs":
            assert row["axis_turn"] == pytest.approx(45.0, abs=1e-6)
            assert row["proxy_turned"] == pytest.approx(row["proxy_original"], rel=1e-9)
        elif row["method"] == "ancer":
            assert row["axis_turn"] in (0.0, 90.0)
        else:
            assert math.isnan(row["axis_turn"])
    table = toy.summary_table(rows, 45.0)
    assert len(table.cells) == len(rows) and "45°" in table.caption
    assert table.cells[-1][0] == "RDDRS" and table.cells[-1][-1] == "45.0"
    assert table.cells[0][4:] == ["–", "–", "–"]  # DDRS has no principal axis
    assert table.cells[0][2] == f"{rows[0]['proxy_original']:.3f}"


# -- plots --------------------------------------------------------------------------------------


def test_problem_plot(model, original_and_turned):
    original, _ = original_and_turned
    data = toy.make_dataset(n_per_class=20)
    fig, ax = plt.subplots()
    toy.plot_problem(ax, model, data, original, extent=2.5, title="t")
    assert ax.get_aspect() == 1.0
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == [METHOD_LABELS[m] for m in toy.SMOOTHED_METHODS]
    patches = [p for p in ax.patches]
    assert len(patches) == 3 * 2
    colours = {to_hex(p.get_edgecolor()) for p in patches}
    assert colours == {METHOD_STYLES[m]["color"].lower() for m in toy.SMOOTHED_METHODS}
    # the background is the classifier's argmax on a grid whose sample j lies in pixel j
    # (linspace point -e + 2ej/(n-1) is in [-e + 2ej/n, -e + 2e(j+1)/n]); row = x2, column = x1
    picture = ax.get_images()[0]
    assert picture.get_extent() == [-2.5, 2.5, -2.5, 2.5] and picture.origin == "lower"
    image = np.asarray(picture.get_array())
    grid = torch.linspace(-2.5, 2.5, image.shape[0], dtype=torch.float64)
    cells = np.random.default_rng(0).integers(0, image.shape[0], size=(20, 2))
    expected = model(torch.stack([grid[cells[:, 1]], grid[cells[:, 0]]], 1)).argmax(-1).numpy()
    np.testing.assert_array_equal(image[cells[:, 0], cells[:, 1]], expected)
    plt.close(fig)


def test_proxy_by_angle_plot(original_and_turned):
    original, turned = original_and_turned
    fig, ax = plt.subplots()
    toy.plot_proxy_by_angle(ax, {45.0: turned, 0.0: original}, point=1)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [METHOD_LABELS[m] for m in toy.SMOOTHED_METHODS]
    for method, line in zip(toy.SMOOTHED_METHODS, lines):
        np.testing.assert_allclose(line.get_xdata(), [toy.TILT, toy.TILT + 45.0])
        np.testing.assert_allclose(line.get_ydata(), [original[method][1].proxy_radius, turned[method][1].proxy_radius])
    plt.close(fig)
