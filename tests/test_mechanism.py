"""The mechanism measures against closed forms, and the study end to end at the smoke preset."""

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import raises_one_line
from scipy import stats

from rddrs.core import presets, spd
from rddrs.core.certify import ABSTAIN
from rddrs.core.noise import Diagonal, FullSPD, Isotropic
from rddrs.pipeline.data import load_dataset
from rddrs.studies import headline, mechanism
from rddrs.studies.study import Study, Variant, run_study
from rddrs.studies.validity import LinearClassifier

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DATA, MODELS = ROOT / "data", ROOT / "data" / "models"
D = 12


class Constant(torch.nn.Module):
    """Every input gets class ``cls`` (of 10)."""

    def __init__(self, cls: int):
        super().__init__()
        self.cls = cls

    def forward(self, z):
        return torch.nn.functional.one_hot(torch.full((len(z),), self.cls), 10).to(z) * 5.0


def test_spectrum_and_axes_of_known_laws():
    w = torch.tensor([0.3, 0.5, 2.0, 20.0, 200.0, 1.0, 0.7, 0.9, 1.5, 0.4, 0.6, 0.8], dtype=torch.float64)
    q = spd.random_orthogonal(D, seed=3)
    law = FullSPD(((q * w) @ q.T)[None].float())
    s = mechanism.spectrum(law)
    assert (s["above_1"], s["above_10"], s["above_100"]) == (4, 2, 1)
    assert s["largest"] == pytest.approx(200.0, rel=1e-5) and s["smallest"] == pytest.approx(0.3, rel=1e-4)
    scale, axes = mechanism.top_axes(law, 2)
    np.testing.assert_allclose(scale, [200.0, 20.0], rtol=1e-5)
    for v, k in zip(axes, (4, 3)):  # the eigenvectors of the two largest scales, up to sign
        assert abs(float(v @ q[:, k])) == pytest.approx(1.0, abs=1e-4)
    theta = Diagonal(w[None].float())
    scale, axes = mechanism.top_axes(theta, 3)
    np.testing.assert_allclose(scale, [200.0, 20.0, 2.0], rtol=1e-6)
    assert [int(v.argmax()) for v in axes] == [4, 3, 2]
    assert mechanism.top_axes(Isotropic(torch.tensor([0.5]), D), 2) is None
    assert mechanism.spectrum(Isotropic(torch.tensor([0.5]), D))["above_1"] == 0


def test_the_margin_gradient_of_a_linear_classifier_is_its_normal():
    w = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = LinearClassifier(w, 0.3)
    x = torch.randn(1, D, dtype=torch.float64)
    torch.testing.assert_close(mechanism.margin_gradient(model, x, 1), w)
    torch.testing.assert_close(mechanism.margin_gradient(model, x, 0), -w)


def test_a_constant_classifier_is_constant_under_any_law():
    model = Constant(3)
    law = Isotropic(torch.tensor([0.4]), 784)
    x = torch.rand(1, 1, 28, 28)
    others = torch.rand(6, 1, 28, 28)
    other_labels = np.array([0, 1, 2, 4, 5, 3])
    own = mechanism.constancy(model, x, 3, law, others, other_labels, 50, 0, 7)
    assert own["others"] == 5 and own["wins"] == own["share_own_class"] == own["black"] == own["noise"] == 1.0
    assert own["their_own_class"] == 0.0
    other = mechanism.constancy(model, x, 5, law, others, other_labels, 50, 0, 7)
    assert other["others"] == 5 and other["wins"] == other["share_own_class"] == other["at_x"] == 0.0


def test_the_split_of_a_linear_classifier_has_its_closed_form():
    """Noise along axes orthogonal to w never moves the score; along the others the share of the
    class is Phi(score / ||S w||)."""
    g = torch.Generator().manual_seed(1)
    q = spd.random_orthogonal(D, seed=5)
    w_vec = q[:, 0] * 0.8 + q[:, 1] * 0.6  # the normal lies in the span of the two small axes
    scales = torch.tensor([0.3, 0.5] + [30.0] * (D - 2), dtype=torch.float64)
    law = FullSPD(((q * scales) @ q.T)[None].float())
    model = LinearClassifier(w_vec.float(), 0.0)
    x = (0.2 * w_vec + 0.01 * torch.randn(D, generator=g, dtype=torch.float64)).float()[None]
    out = mechanism.split(model, x, 1, law, 40_000, 0, 3)
    score = float(model.score(x)[0])
    small = (q[:, :2] * scales[:2]) @ q[:, :2].T
    exact = stats.norm.cdf(score / float(torch.linalg.norm(small @ w_vec)))
    assert out["scales_above"] == D - 2 and out["above"] == 1.0
    assert out["at_most"] == pytest.approx(exact, abs=0.01)
    assert out["isotropic_smallest"] == pytest.approx(stats.norm.cdf(score / (0.3 * float(w_vec.norm()))), abs=0.01)


def test_refutation_refutes_an_inflated_certificate_and_not_a_fixed_law_one():
    """RS' pipeline does not depend on the input: a point inside its exact region keeps its class.
    A radius three times the exact distance to the boundary is refuted: the attack crosses the
    boundary, where the pipeline certifies the other class."""
    d = 784
    g = torch.Generator().manual_seed(2)
    w = torch.randn(d, generator=g) / d**0.5
    model = LinearClassifier(w, 0.0)
    x = 0.25 + 0.5 * torch.rand(4, d, generator=g)
    x = x + ((1.0 - model.score(x)) / w.dot(w))[:, None] * w  # w.x = 1: distance 1 / ||w|| from the boundary
    assert ((x > 0) & (x < 1)).all()  # images: the attack keeps its points in [0, 1]
    labels = np.ones(4, dtype=int)
    exact = 1.0 / float(w.norm())
    study = Study("t", 4, (Variant("rs", "rs"),))
    law = Isotropic(torch.full((4,), 0.25), d)
    model_file = MODELS / "mnist_cnn_sigma0.25.pt"
    common = dict(
        study=study,
        variant=study.variant("rs"),
        sigma=0.25,
        preset="smoke",
        model_file=model_file,
        steps=5,
        samples=16,
        check=400,
    )
    inside = mechanism.refutation(
        model, x, labels, [0, 1, 2, 3], np.full(4, 0.25), np.full(4, 0.9 * exact), law, **common
    )
    assert not any(r["refuted"] for r in inside) and all(r["fixed_law_share"] > 0.5 for r in inside)
    assert all(r["distance"] <= 0.9 * exact * 0.999 * (1 + 1e-5) for r in inside)
    beyond = mechanism.refutation(
        model, x, labels, [0, 1, 2, 3], np.full(4, 0.25), np.full(4, 3 * exact), law, **common
    )
    assert all(r["refuted"] and r["predict"] == 0 for r in beyond)
    assert all(r["box"] == [0.0, 1.0] and 0 <= r["point_range"][0] <= r["point_range"][1] <= 1 for r in beyond)
    assert all(r["fixed_law_class"] == 0 for r in beyond)  # the same law held fixed says so too


def test_the_mechanism_study_at_the_smoke_preset(tmp_path):
    study = headline.mechanism_study("smoke")
    results = tmp_path / "results"
    runs = run_study(study, presets.STUDY_SIGMA, "smoke", results, data=DATA, models=MODELS)
    assert set(runs) == {v.name for v in study.variants}
    rows = headline.measures("smoke", results, data=DATA, models=MODELS)
    assert len(rows) == len(study.variants) * study.count
    for row in rows:
        c = row["constancy"]
        assert 0 <= c["share_own_class"] <= 1 and 0 <= c["wins"] <= 1 and c["others"] == 27
        assert (row["axes"] is None) == (row["method"] in ("rs", "ddrs"))
        assert row["spectrum"]["smallest"] <= row["spectrum"]["largest"]
    assert (results / "claims" / "mechanism" / "measures.json").exists()
    refuted = headline.refutations("smoke", results, data=DATA, models=MODELS)
    assert refuted and {r["variant"] for r in refuted} <= {v.name for v in study.variants}
    labels = load_dataset(DATA, train=False)[1]
    for r in refuted:
        assert r["distance"] <= r["radius"] * (1 + 1e-5)
        # refuted: at the attacked point the pipeline certifies a class, and not the image's own
        assert r["abstain"] == (r["predict"] == ABSTAIN)
        assert r["refuted"] == (not r["abstain"] and r["predict"] != int(labels[r["idx"]]))
    passes = headline.memories("smoke", results, data=DATA, models=MODELS)
    assert (
        set(passes) == set(headline.tested_names("smoke")) == {v.name for v in study.variants}
        and (results / "claims" / "mechanism" / "memory.json").exists()
    )
    here = f"cpu ({platform.processor() or platform.machine()})"  # the device the rows were written on
    for name, entry in passes.items():
        assert sum(entry["statuses"].values()) == entry["images"] >= study.count
        assert entry["after"]["l2"] <= entry["before"]["l2"] + 1e-12 and entry["devices"] == [here]
        assert len(entry["nearest_other"]) <= entry["images"] and not entry["rerun"]
        # an intruder lies inside a kept region (gauge < 1): a region holds one iff its nearest other image does
        assert entry["regions_with_intruders"] == sum(g < 1 for g in entry["nearest_other"])
        assert (entry["intruders"] > 0) == (entry["regions_with_intruders"] > 0)
        assert entry["test_images"] == 10_000


def test_memory_passes_read_the_laws_of_a_rerun_where_the_traces_were_not_kept(tmp_path):
    study = headline.mechanism_study("smoke")
    results, rerun = tmp_path / "results", tmp_path / "rerun"
    run_study(study, presets.STUDY_SIGMA, "smoke", results, data=DATA, models=MODELS)
    folder = results / "claims" / "mechanism"
    name = next(v.name for v in study.variants if v.method == "rddrs")
    shutil.copytree(folder, rerun)
    shutil.rmtree(folder / f"{name}.tsv.traces")  # as a GPU session's runs are landed: without traces
    passes = headline.memories("smoke", results, data=DATA, models=MODELS, laws_from=rerun)
    assert passes[name]["source"] == str((rerun / f"{name}.tsv").resolve()) and passes[name]["rerun"]
    assert passes["ddrs_clamped"]["source"] == "claims/mechanism/ddrs_clamped.tsv"  # its own rows suffice
    (folder / "memory.json").unlink()
    without = headline.memories("smoke", results, data=DATA, models=MODELS)
    # no laws: no pass, so that run is the one `rddrs mechanism` names as untested
    assert set(headline.tested_names("smoke")) - set(without) == {name}
    (folder / "memory.json").unlink()
    meta = json.loads((rerun / f"{name}.tsv.json").read_text())
    meta["settings"]["seed"] = 7
    (rerun / f"{name}.tsv.json").write_text(json.dumps(meta))
    assert "other settings" in raises_one_line(
        headline.memories, "smoke", results, data=DATA, models=MODELS, laws_from=rerun
    )


def test_figure2s_other_panels_are_attacked_and_their_points_checked_against_the_memory(tmp_path):
    """At sigma 0.5 the fill's runs stand in for the mechanism study: their first images are
    attacked (each point kept with its row) and the memory pass over every run says where each
    attacked point lies. A point inside a certified l2 ball lies in its image's region, so
    wherever the memory kept that region it answers the certified class there."""
    from datetime import datetime, timedelta

    from rddrs.core.regions import KEPT
    from rddrs.pipeline.memory import read_memory_rows
    from rddrs.studies import fill

    results, common = tmp_path / "results", dict(data=DATA, models=MODELS)
    fill.fill(
        results,
        datetime.now() + timedelta(hours=1),
        sigmas=(0.5,),
        images=2,
        preset="smoke",
        log=lambda line: None,
        **common,
    )
    assert "no rows" in raises_one_line(headline.refutations, "smoke", results, sigma=0.12, **common)  # none there
    refuted = headline.refutations("smoke", results, sigma=0.5, **common)
    folder = headline.tested_dir("smoke", results, 0.5)
    assert folder.name == "figure2_sigma0.50" and (folder / "refutations.json").exists()
    assert refuted and {r["variant"] for r in refuted} <= set(headline.REFUTED)
    images, labels = load_dataset(DATA, train=False)
    for r in refuted:
        point = mechanism.decode_point(r["point"])
        assert point.shape == (784,) and [float(point.min()), float(point.max())] == r["point_range"]
        assert float((point.double() - images[r["idx"]].reshape(-1).double()).norm()) == pytest.approx(
            r["distance"], rel=1e-5
        )
    passes = headline.memories("smoke", results, sigma=0.5, refresh=True, **common)
    runs = headline.tested_runs("smoke", results, 0.5, **common)[1]
    measured = headline.constancies("smoke", results, 0.5, **common)
    assert [(r["variant"], r["idx"]) for r in measured] == [
        (name, i) for name in ("ancer_clamped", "rddrs_clamped") for i in runs[name].results.idx.tolist()
    ]
    assert all(r["constancy"]["others"] == 9 and 0 <= r["constancy"]["wins"] <= 1 for r in measured)  # 1 per class
    assert (folder / "constancy.json").exists()
    assert "mechanism study" in raises_one_line(headline.constancies, "smoke", results, presets.STUDY_SIGMA)
    assert set(passes) == set(headline.tested_names("smoke", 0.5)) == set(headline.PAIRED)
    assert (folder / "memory.json").exists()
    checked = 0
    for name, entry in passes.items():
        attacked = {(r["idx"]) for r in refuted if r["variant"] == name}
        assert {a["idx"] for a in entry["attacked"]} == attacked
        run = runs[name].path
        memory = {row["idx"]: row for row in read_memory_rows(run.with_name(run.name + ".memory.tsv"))}
        for a in entry["attacked"]:
            if memory[a["idx"]]["memory"] == KEPT:
                assert a["own_gauge"] < 1 and a["answer"] == memory[a["idx"]]["predict"] == labels[a["idx"]]
                checked += 1
    assert checked > 0
    assert headline.memories("smoke", results, sigma=0.5, **common) == passes  # read back as stored
    found = headline.guarantees("smoke", results)
    assert list(found) == [0.5]  # nothing attacked at the other sigmas
    for name, c in found[0.5].items():
        rows = [r for r in refuted if r["variant"] == name]
        assert (c["tested"], c["refuted"]) == (len(rows), sum(r["refuted"] for r in rows)) and c["boxed"]
        assert c["held"] == sum(r["fixed_law_share"] > 0.5 for r in rows) and "unboxed" not in c
        assert c["in_memory"] == sum(
            a["answer"] == a["label"]
            for a in passes[name]["attacked"]
            if a["idx"] in {r["idx"] for r in rows if r["refuted"]}
        )
    stored = json.loads((folder / "refutations.json").read_text())
    for entry in stored["variants"].values():  # an earlier attack that refuted everything
        entry["rows"] = [{**r, "refuted": True} for r in entry["rows"]]
    (folder / "refutations_unboxed.json").write_text(json.dumps(stored))
    assert all(c["unboxed"] == c["tested"] for c in headline.guarantees("smoke", results)[0.5].values())
    # a run landed without its traces (a GPU session's): attacked all the same, the law held fixed untested
    name = next(r["variant"] for r in refuted if r["variant"] in ("rddrs_clamped", "ancer_clamped"))
    path = runs[name].path
    shutil.rmtree(path.with_name(path.name + ".traces"))
    stored = json.loads((folder / "refutations.json").read_text())
    del stored["variants"][name]
    (folder / "refutations.json").write_text(json.dumps(stored))
    again = [r for r in headline.refutations("smoke", results, sigma=0.5, **common) if r["variant"] == name]
    assert again and all(r["fixed_law_share"] is None and r["fixed_law_class"] is None and r["point"] for r in again)
    assert [r["refuted"] for r in again] == [r["refuted"] for r in refuted if r["variant"] == name]
    assert headline.guarantees("smoke", results)[0.5][name]["held"] is None
