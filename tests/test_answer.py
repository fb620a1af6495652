"""The answer, said the same way everywhere: the README's key numbers are those of the result files
that the overview and the headline chapter compute them from (a new landing of GPU rows that
changes them makes this test ask for the README to be brought up to date)."""

import collections
import re
from pathlib import Path

import numpy as np
import pytest

from rddrs.core import presets
from rddrs.studies import analysis, headline
from rddrs.studies.study import paired_difference

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "results" / "paper"
COMMON = dict(data=ROOT / "data", models=ROOT / "data" / "models")


@pytest.fixture(scope="module")
def answer():
    runs = headline.read(PAPER, presets.STUDY_SIGMA, **COMMON)
    acr = {
        n: {k: paired_difference(analysis.certified_radius(r, k), np.zeros(r.n)) for k in analysis.KINDS}
        for n, r in runs.items()
    }
    gain = {
        (o, k): paired_difference(
            analysis.certified_radius(runs["rddrs_clamped"], k), analysis.certified_radius(runs[o], k)
        )
        for o in ("ancer_clamped", "ddrs_capped", headline.OTHER_STEP.name)
        for k in analysis.KINDS
    }
    refuted = collections.Counter()
    tested = collections.Counter()
    for row in headline.refutations("paper", PAPER, compute=False, **COMMON):
        tested[row["variant"]] += 1
        refuted[row["variant"]] += row["refuted"]
    return runs, acr, gain, refuted, tested


def test_the_readme_states_the_numbers_of_the_result_files(answer):
    runs, acr, gain, refuted, tested = answer
    readme = (ROOT / "README.md").read_text()
    assert f"on the {runs['rs'].n} MNIST test images that every run" in " ".join(readme.split())
    for name in headline.PAIRED:
        for kind in analysis.KINDS:
            mean, se = acr[name][kind]
            assert f"{mean:.3f} +- {se:.3f}" in readme, (name, kind)
        if name in headline.REFUTED:
            assert re.search(
                rf"\| {refuted[name]} of {tested[name]} \|",
                readme.split(
                    "| "
                    + {
                        "ddrs_clamped": "DDRS, the authors'",
                        "ddrs_capped": "DDRS, capped",
                        "ancer_clamped": "ANCER, the authors'",
                        "rddrs_clamped": "RDDRS, the authors'",
                    }[name],
                    1,
                )[1].split("\n", 1)[0],
            ), name
    other_step = headline.OTHER_STEP.name
    for other, kind in (
        ("ancer_clamped", "proxy"),
        ("ancer_clamped", "l2"),
        ("ddrs_capped", "l2"),
        (other_step, "proxy"),
        (other_step, "l2"),
    ):
        mean, se = gain[(other, kind)]
        assert f"{mean:+.3f} +- {se:.3f}" in readme, (other, kind)


def test_the_readme_states_the_other_panels_proxy_differences():
    readme = " ".join((ROOT / "README.md").read_text().split())
    panels = headline.panels(PAPER, **COMMON)

    def minus(panel, other, kind):
        return paired_difference(
            analysis.certified_radius(panel["rddrs_clamped"], kind), analysis.certified_radius(panel[other], kind)
        )

    low, high = (
        [minus(panels[s], a, "proxy") for a in ("ancer_clamped", headline.OTHER_STEP.name)] for s in (0.12, 0.5)
    )
    assert abs(low[0][0]) <= 2 * low[0][1]  # "level"
    assert (
        "at sigma 0.12, {:+.3f} +- {:.3f} against ANCER at 0.04 (level: within twice its standard error) and "
        "{:+.3f} +- {:.3f} against ANCER at 0.4; at sigma 0.5, {:+.3f} +- {:.3f} and {:+.3f} +- {:.3f}.".format(
            *low[0], *low[1], *high[0], *high[1]
        )
        in readme
    )
    assert (
        all(  # "ahead of every other method ... in all three panels"
            minus(panel, n, "l2")[0] > 2 * minus(panel, n, "l2")[1]
            for panel in panels.values()
            for n in headline.PAIRED
            if n != "rddrs_clamped"
        )
        and len(panels) == 3
    )


def test_the_ordering_the_overview_states_holds(answer):
    runs, acr, gain, refuted, tested = answer
    assert max(acr, key=lambda n: acr[n]["l2"][0]) == "rddrs_clamped"
    # in the proxy radius RDDRS leads ANCER at the pipeline's step size, and trails it at the paper's other one
    assert gain[("ancer_clamped", "proxy")][0] > 2 * gain[("ancer_clamped", "proxy")][1]
    assert -gain[(headline.OTHER_STEP.name, "proxy")][0] > 2 * gain[(headline.OTHER_STEP.name, "proxy")][1]
    assert max(acr, key=lambda n: acr[n]["proxy"][0]) == headline.OTHER_STEP.name
    assert refuted["rddrs_clamped"] > refuted["ancer_clamped"] > refuted["ddrs_clamped"]


def test_the_readme_states_what_survives_the_memory():
    passes = headline.memories("paper", PAPER, **COMMON)  # read from memory.json
    readme = " ".join((ROOT / "README.md").read_text().split())
    rd, an = passes["rddrs_clamped"], passes["ancer_clamped"]
    assert rd["statuses"]["kept"] == rd["images"] == 20 and rd["intruders"] == an["intruders"] == 0
    assert (
        f"keeps all {rd['images']} RDDRS certificates (l2 ACR {rd['after']['l2']:.3f}, against ANCER's "
        f"{an['after']['l2']:.3f}" in readme
    )
    assert f"none of the {rd['test_images']:,} test images".replace(",", " ") in readme
    half = headline.memories("paper", PAPER, sigma=0.5, **COMMON)
    rd, an = half["rddrs_clamped"], half["ancer_clamped"]
    assert (
        f"the memory over the panel's first {rd['images']} images, those whose laws were on the machine" in readme
        and f"the memory keeps {rd['statuses']['kept']} of {rd['images']} RDDRS certificates, its l2 ACR falls from "
        f"{rd['before']['l2']:.3f} to {rd['after']['l2']:.3f}, below ANCER's {an['after']['l2']:.3f}, and "
        f"{rd['intruders']} test images of another class"
        in readme
    )
    low = headline.memories("paper", PAPER, sigma=0.12, **COMMON)
    rd, an = low["rddrs_clamped"], low["ancer_clamped"]
    assert rd["statuses"]["kept"] == rd["images"] and rd["intruders"] == 0  # "keeps all", "no test image"
    assert (
        f"At sigma 0.12 (the memory over its first {rd['images']} images, "
        f"`results/paper/claims/figure2_sigma0.12/memory.json`) it keeps all {rd['images']} RDDRS certificates "
        f"(l2 ACR {rd['after']['l2']:.3f}, against ANCER's {an['after']['l2']:.3f})" in readme
    )


def test_the_readme_states_the_attacks_at_the_other_panels():
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = headline.guarantees("paper", PAPER)
    for sigma in (0.5, 0.12):
        c = {n: (found[sigma][n]["refuted"], found[sigma][n]["tested"]) for n in headline.REFUTED}
        stated = (
            "at sigma {:g}, {} of {} RDDRS certificates were refuted ({} of {} ANCER's, {} of {} of the authors' DDRS, "
            "{} of {} of the capped DDRS)".format(
                sigma, *c["rddrs_clamped"], *c["ancer_clamped"], *c["ddrs_clamped"], *c["ddrs_capped"]
            )
        )
        assert stated in readme, sigma
        rd = found[sigma]["rddrs_clamped"]
        after = readme.split(stated, 1)[1].split(";", 1)[0]  # the memory's answer, said in the same clause
        assert f"answers x's class at {rd['in_memory']} of RDDRS' {rd['refuted']} refuting points" in after, sigma
        # every point an image, and "x's class held at every attacked point of both panels"
        assert all(v["boxed"] and v["held"] == v["tested"] for v in found[sigma].values())


def test_the_readme_states_the_coverage_before_any_number():
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = " ".join(readme.split("## What the book finds", 1)[1].split())
    coverage = found.split("**At the paper's own settings", 1)[0]
    runs = headline.read(PAPER, presets.STUDY_SIGMA, **COMMON)
    stated = f"sigma = 0.25 on {runs['rs'].n} of the 10 000 test images (indices {headline.coverage(runs['rs'].idx)})"
    assert stated in coverage and not re.search(r"\d\.\d{3}", coverage)  # the extent, and no ACR before it
    panels = headline.panels(PAPER, **COMMON)
    least = int(re.search(r"at least (\d+) of each", coverage)[1])
    assert all(s in panels and panels[s]["rs"].n >= least for s in (0.5, 0.12))  # the fill only adds rows


def test_the_readme_states_the_mechanism_of_the_measures():
    rd = [r for r in headline.measures("paper", PAPER, **COMMON) if r["variant"] == "rddrs_clamped"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    above1 = [r["spectrum"]["above_1"] for r in rd]
    assert (
        f"a median of {np.median(above1):.0f} of its 784 scales exceed 1 pixel unit (from {min(above1)} to "
        f"{max(above1)} over the images; a median of {np.median([r['spectrum']['above_10'] for r in rd]):.0f} "
        f"exceed 10)"
    ) in readme
    from rddrs.pipeline.data import load_dataset

    norm = float(load_dataset(COMMON["data"], train=False)[0].flatten(1).norm(dim=1).mean())
    largest = np.median([r["spectrum"]["largest"] for r in rd])
    assert f"l2 norm of an average test image ({norm:.1f})" in readme and 5 < largest / norm < 20  # "about ten times"
    small = np.mean([r["split"]["at_most"] for r in rd])
    whole = np.mean([r["constancy"]["at_x"] for r in rd])
    assert (
        f"with the small axes alone x's class gets {small:.3f} of the votes, with the whole law {whole:.3f}" in readme
    )
    assert "directions the network ignores" not in readme


def test_the_readme_states_the_scales_of_ancer_at_the_other_step_size():
    from rddrs.pipeline.results import read_rows

    runs = headline.read(PAPER, presets.STUDY_SIGMA, **COMMON)
    name = headline.OTHER_STEP.name
    rows = read_rows(PAPER / "claims" / headline.figure2_name(presets.STUDY_SIGMA) / f"{name}.tsv")
    scales = {k: np.median([rows[i][f"sigma_{k}"] for i in runs[name].idx.tolist()]) for k in ("min", "max")}
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "(largest about 27, smallest about 0.5 at the median)" in readme
    assert abs(scales["max"] - 27) < 1 and abs(scales["min"] - 0.5) < 0.05, scales


def test_the_readme_states_the_attack_at_sigma_025_with_its_points_in_the_box():
    found = headline.guarantees("paper", PAPER)[presets.STUDY_SIGMA]
    assert all(c["boxed"] and c["tested"] == 20 for c in found.values())
    readme = " ".join((ROOT / "README.md").read_text().split())
    now = [f"{found[n]['refuted']} of 20" for n in headline.REFUTED]
    before = ", ".join(str(found[n]["unboxed"]) for n in headline.REFUTED)
    assert (
        f"{now[0]} RDDRS certificates were refuted ({now[1]} ANCER's, {now[2]} of the authors' DDRS and {now[3]} of "
        f"the capped DDRS; an earlier attack that let its points leave the images' cube found "
        f"{before.rsplit(', ', 1)[0]} and {before.rsplit(', ', 1)[1]})"
    ) in readme
