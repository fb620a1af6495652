"""Tests of ``rddrs.studies.display``: tables, the figure style and its legibility check, method and
variant styles, the provenance note; and the book's sample points in ``rddrs.core.spd``."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.methods import METHODS
from rddrs.studies import display


class _Cells(HTMLParser):
    """The caption, and every cell's tag, text and style, of the first table in a document."""

    def __init__(self):
        super().__init__()
        self.caption, self.cells, self._tag, self._style = "", [], None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td", "caption"):
            self._tag, self._style = tag, dict(attrs).get("style", "")
            if tag != "caption":
                self.cells.append([tag, "", self._style])

    def handle_endtag(self, tag):
        if tag == self._tag:
            self._tag = None

    def handle_data(self, data):
        if self._tag == "caption":
            self.caption += data
        elif self._tag:
            self.cells[-1][1] += data


def parse(table: display.Table) -> _Cells:
    cells = _Cells()
    cells.feed(table._repr_html_())
    return cells


def sample_table(**kwargs):
    return display.Table(
        ["σ", "method", "n", "ACR", "difference"],
        [[0.12, "RS", 100, 0.5123, "+0.012 ± 0.004"], [0.25, "RDDRS <b>", 10_000, 12.3456, "−0.100 ± 0.020"]],
        caption="ACR by method",
        formats={"σ": "g"},
        **kwargs,
    )


# -- tables -----------------------------------------------------------------------------------


def test_table_html_has_caption_and_aligns_numbers_right():
    cells = parse(sample_table())
    assert cells.caption == "ACR by method"
    header = [c for c in cells.cells if c[0] == "th"]
    body = [c for c in cells.cells if c[0] == "td"]
    assert [c[1] for c in header] == ["σ", "method", "n", "ACR", "difference"]
    assert len(body) == 2 * 5
    right = ["right" in c[2] for c in header]
    assert right == ["right" in c[2] for c in body[:5]]
    assert right == [True, False, True, True, True]  # the text column alone is left-aligned
    assert [c[1] for c in body[:5]] == ["0.12", "RS", "100", "0.5", "+0.012 ± 0.004"]
    assert [c[1] for c in body[5:]] == ["0.25", "RDDRS <b>", "10,000", "12.3", "−0.100 ± 0.020"]


def test_table_escapes_text_but_keeps_raw_html():
    html = sample_table()._repr_html_()
    assert "RDDRS &lt;b&gt;" in html
    raw = display.Table(["x"], [[display.Raw("λ<sub>min</sub>")]], caption="raw")
    assert "λ<sub>min</sub>" in raw._repr_html_()
    assert "λmin" in repr(raw)


def test_one_precision_per_column():
    # three significant digits for the largest value, the same decimals for the whole column
    t = display.Table(["a", "b", "c", "d"], [[0.5, 3.14159, 250.4, 1e-5], [0.0125, 0.5, 12.0, 3e-6]], caption="c")
    assert [row for row in t.cells] == [["0.500", "3.14", "250", "1.00e-05"], ["0.013", "0.50", "12", "3.00e-06"]]
    assert display.auto_decimals([0.95, 0.3]) == 3
    assert display.auto_decimals([25.0]) == 1
    assert display.auto_decimals([2e-4]) is None
    assert display.auto_decimals([]) == 0
    assert display.format_number(float("nan")) == display.format_number(None) == "–"
    assert display.format_number(True) == "yes"
    assert display.format_number(0.1234, ".1%") == "12.3%"
    t = display.Table(["variant", "proxy"], [["a", 1.23456], ["b", "diverged"]], caption="c", formats={"proxy": ".3f"})
    assert [row[1] for row in t.cells] == ["1.235", "diverged"]


def test_text_and_markdown_forms_are_aligned_tables():
    t = sample_table()
    lines = repr(t).splitlines()
    assert lines[0] == "ACR by method"
    # a numeric column ends at the same character on every line (here the column n)
    ends = {lines[1].index(" n ") + 2, lines[3].index(" 100 ") + 4, lines[4].index(" 10,000 ") + 7}
    assert len(ends) == 1
    md = t.markdown().splitlines()
    assert md[0] == "| σ | method | n | ACR | difference |"
    assert md[1] == "| ---: | :--- | ---: | ---: | ---: |"
    assert len(md) == 4 and "|" not in repr(t)


def test_spanning_header_and_merged_groups():
    t = display.Table(
        ["σ", "method", "0", "0.5"],
        [[0.12, "RS", 1.0, 0.5], [0.12, "RDDRS", 1.0, 0.75], [0.25, "RS", 0.9, 0.25]],
        caption="grouped",
        spans=[("", 2), ("CA at r =", 2)],
        merge=["σ"],
        formats={"σ": ".2f"},
    )
    html = t._repr_html_()
    assert '<th class="span" colspan="2">CA at r =</th>' in html
    cells = parse(t)
    sigma = [c[1] for c in cells.cells if c[0] == "td"][::4]
    assert sigma == ["0.12", "", "0.25"]  # written where it changes
    assert html.count('<tr class="group">') == 1
    assert repr(t).splitlines()[1].strip().startswith("CA at r =")
    assert t.markdown().splitlines()[0] == "| σ | method | CA at r = 0 | CA at r = 0.5 |"
    assert t.markdown().splitlines()[3].startswith("| 0.12 | RDDRS")  # files keep every value
    with pytest.raises(RDDRSError, match="spans cover 3 of 4"):
        display.Table(["a", "b", "c", "d"], [[1, 2, 3, 4]], caption="c", spans=[("x", 3)])
    with pytest.raises(RDDRSError, match="leading columns"):
        display.Table(["a", "b"], [[1, 2]], caption="c", merge=["b"])


def test_table_refuses_bad_input():
    with pytest.raises(RDDRSError, match="caption"):
        display.Table(["a"], [[1]], caption=" ")
    with pytest.raises(RDDRSError, match="row 0"):
        display.Table(["a", "b"], [[1]], caption="c")
    with pytest.raises(RDDRSError, match="unknown column"):
        display.Table(["a"], [[1]], caption="c", formats={"b": ".2f"})


def test_numbers_written_as_text_are_recognised():
    for text in ("0.52 / 0.48", "+0.012 ± 0.004", "1.2e-03", "3.1 s", "2.9 ×", "[0.010, 0.120]", "12 %"):
        assert display._reads_as_number(text), text
    for text in ("RDDRS", "2 min on cpu (x86_64)", "not run", "", "—"):
        assert not display._reads_as_number(text), text


# -- figures ----------------------------------------------------------------------------------


def test_new_figure_is_legible_and_small_text_is_caught():
    fig, ax = display.new_figure(height=2.5)
    ax.plot([0, 1], [0, 1], label="a line")
    ax.set(xlabel="x", ylabel="y", title="title")
    ax.legend()
    display.check_legible(fig)
    assert tuple(fig.get_size_inches()) == (display.PAGE_WIDTH, 2.5)
    ax.text(0.5, 0.5, "tiny", fontsize=7)
    with pytest.raises(RDDRSError, match="under 9 pt.*tiny"):
        display.check_legible(fig)
    wide, _ = display.new_figure(width=9.0)
    with pytest.raises(RDDRSError, match="wide"):
        display.check_legible(wide)


def test_tick_labels_take_the_style_outside_its_context():
    import matplotlib

    with matplotlib.rc_context({"xtick.labelsize": 5, "ytick.labelsize": 5}):
        fig, ax = display.new_figure()
        ax.plot([0, 10], [0, 10])
        display.check_legible(fig)  # the tick labels are drawn here, under the 5 pt rc


def test_book_style_uses_no_method_colour_for_other_curves():
    import matplotlib

    with matplotlib.rc_context():
        display.use_book_style()
        cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
        assert matplotlib.rcParams["savefig.dpi"] >= 200
        assert matplotlib.rcParams["xtick.labelsize"] >= display.MIN_FONT
    method_colours = {style["color"].lower() for style in display.METHOD_STYLES.values()}
    assert cycle == list(display.OTHER_COLORS)
    assert not method_colours & {c.lower() for c in cycle}


def test_method_and_variant_styles_come_from_the_one_table_of_method_styles():
    assert list(display.METHOD_STYLES) == list(METHODS)  # every method, no other
    assert len({s["color"] for s in display.METHOD_STYLES.values()}) == len(METHODS)
    assert len({s["linestyle"] for s in display.METHOD_STYLES.values()}) == len(METHODS)
    for name, m in METHODS.items():
        assert display.method_style(name) == {**display.METHOD_STYLES[name], "label": m.label}
    styles = display.variant_styles(["rddrs", "ancer", "rddrs", "rddrs"])
    assert {k: styles[1][k] for k in ("color", "linestyle")} == display.METHOD_STYLES["ancer"]
    shades = [styles[i]["color"] for i in (0, 2, 3)]
    assert shades[0] == display.METHOD_STYLES["rddrs"]["color"] and len(set(shades)) == 3
    lightness = [sum(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in shades]
    assert lightness == sorted(lightness)  # from the method's colour towards white
    assert len({(s["linestyle"], s["marker"]) for s in (styles[0], styles[2], styles[3])}) == 3


# -- provenance ---------------------------------------------------------------------------------


def write_sidecar(path, preset, device, threads, commit, created):
    path.write_text("idx\n", encoding="utf-8")
    side = {
        "settings": {"method": "rs", "preset": preset},
        "provenance": {
            "versions": {"rddrs": "0.1.0", "torch": "2.14.1"},
            "device": device,
            "threads": threads,
            "git_commit": commit,
            "git_dirty": False,
            "created": created,
        },
    }
    path.with_name(path.name + ".json").write_text(json.dumps(side), encoding="utf-8")


def test_provenance_note_names_preset_machine_commit_and_command(tmp_path):
    write_sidecar(tmp_path / "rs_sigma0.25.tsv", "cpu", "cpu (x86_64)", 2, "abcdef0123", "2026-01-02T10:00:00")
    (tmp_path / "claims").mkdir()
    write_sidecar(tmp_path / "claims" / "a.tsv", "cpu", "cuda (NVIDIA H200)", 1, None, "2026-01-05T10:00:00")
    note = display.provenance_note(tmp_path, "cpu", "make results PRESET=cpu")
    text = repr(note)
    assert "Preset cpu: 2 result files" in text
    assert "2026-01-02 to 2026-01-05" in text
    assert "cpu (x86_64) (2 threads)" in text and "cuda (NVIDIA H200) (1 thread)" in text
    assert "commit abcdef0; 1 recorded none" in text
    assert "make results PRESET=cpu" in text
    html = note._repr_html_()
    assert html.startswith('<div class="admonition note') and "<code>make results PRESET=cpu</code>" in html


def test_provenance_note_without_results_says_they_are_computed_now(tmp_path):
    text = repr(display.provenance_note(tmp_path / "missing", "smoke", "make results PRESET=smoke"))
    assert "No result files" in text and "smoke" in text and "computes them" in text


# -- sample points ------------------------------------------------------------------------------


def test_random_spd_is_seeded_and_bounded():
    a = spd.random_spd(5, batch=(3,), spread=0.7, seed=4)
    assert torch.equal(a, spd.random_spd(5, batch=(3,), spread=0.7, seed=4))
    assert not torch.equal(a, spd.random_spd(5, batch=(3,), spread=0.7, seed=5))
    w = torch.linalg.eigvalsh(a)
    assert a.shape == (3, 5, 5) and torch.equal(a, a.transpose(-1, -2))
    assert (w > np.exp(-0.7) - 1e-12).all() and (w < np.exp(0.7) + 1e-12).all()
    fixed = spd.random_spd(4, eigenvalues=[0.5, 1.0, 2.0, 3.0], seed=1)
    torch.testing.assert_close(torch.linalg.eigvalsh(fixed), torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    q = spd.random_orthogonal(6, batch=(2,), seed=3)
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.eye(6, dtype=torch.float64).expand(2, 6, 6))


def test_planar_matrix_has_the_given_axes():
    c = spd.planar([2.0, 0.5], 30.0)
    w, v = torch.linalg.eigh(c)
    torch.testing.assert_close(w, torch.tensor([0.5, 2.0], dtype=torch.float64))
    major = v[:, 1] * torch.sign(v[0, 1])
    assert np.degrees(np.arctan2(major[1].item(), major[0].item())) == pytest.approx(30.0)
    with pytest.raises(RDDRSError, match="two positive scales"):
        spd.planar([1.0, -1.0], 0.0)


def test_analysis_tables_go_through_display():
    # the Markdown table of rddrs curves and the book's HTML table are one table
    from rddrs.studies import analysis

    rows = [
        {
            "sigma": 0.25,
            "method": "rddrs",
            "n": 4,
            "kind": "l2",
            "radii": np.array([0.0, 0.5]),
            "accuracy": np.array([0.75, 0.5]),
            "acr": 0.41,
            "seconds": 12.0,
        }
    ]
    table = analysis.accuracy_table(rows)
    assert isinstance(table, display.Table)
    assert analysis.table_markdown(rows) == table.markdown()
    assert re.search(r"ℓ2 radius", table.caption)
    assert [c for c in table.cells[0]] == ["0.25", "RDDRS", "4", "0.75", "0.50", "0.410", "12.00"]
    # a certified accuracy is a count over n: as many decimals as every count needs
    rows[0]["n"] = 1000
    assert analysis.accuracy_table(rows).cells[0][3] == "0.750"
    # with errors=True each ACR carries its standard error, and the column still reads as numbers
    rows[0]["acr_se"] = 0.0312
    with_errors = analysis.accuracy_table(rows, errors=True)
    assert with_errors.columns[-2] == "ACR ± s.e." and with_errors.cells[0][-2] == "0.410 ± 0.031"
    assert with_errors.numeric[-2]


def test_captions_typeset_their_plain_text_maths():
    """Captions, headers and notes show exponents and indices as such, never as ^ and _."""
    t = display.typeset
    assert t("an image lies in [0, 1]^784.") == "an image lies in [0, 1]<sup>784</sup>."
    assert t("10^-6 and 2^0.5, e^x") == "10<sup>-6</sup> and 2<sup>0.5</sup>, e<sup>x</sup>"
    assert t("det(S)^(1/d) and 10^4") == "det(S)<sup>1/d</sup> and 10<sup>4</sup>"
    assert t("from σ*_x I, p_A and λ_min") == "from σ*<sub>x</sub> I, p<sub>A</sub> and λ<sub>min</sub>"
    assert t("the ℓ2 radius, max_step = 0.1") == "the ℓ<sub>2</sub> radius, max_step = 0.1"
    assert t("n0 + n, x1, q1 / q3, x86_64") == "n<sub>0</sub> + n, x<sub>1</sub>, q1 / q3, x86_64"
    assert t("a < b & c") == "a &lt; b &amp; c" and t(display.Raw("<b>x_1</b>")) == "<b>x_1</b>"
    table = display.Table(
        ["p_A", "note"], [[0.5, "+0.1 ± 0.2"], [0.7, "a long note that wraps over lines"]], caption="Values at σ*_x"
    )
    page = table._repr_html_()
    assert "<caption>Values at σ*<sub>x</sub></caption>" in page and ">p<sub>A</sub></th>" in page
    assert 'class="text nb"' in page and 'class="text wrap"' in page
    assert "σ*_x" in repr(table)  # the text form stays plain


def test_a_source_tree_version_is_said_in_words(tmp_path):
    import json

    from rddrs.pipeline.provenance import results_provenance

    meta = {
        "settings": {"preset": "paper"},
        "provenance": {
            "device": "cuda",
            "threads": 1,
            "created": "2026-12-01",
            "versions": {"rddrs": "0+unknown", "torch": "2.11"},
        },
    }
    (tmp_path / "a.tsv.json").write_text(json.dumps(meta))
    info = results_provenance(tmp_path)
    assert info["versions"] == {"rddrs from an uninstalled source tree, torch 2.11"}


def test_the_provenance_note_says_where_the_executed_notebook_lands(tmp_path):
    note = display.provenance_note(tmp_path, "smoke", "make results PRESET=smoke CHAPTERS=mnist")._repr_html_()
    assert "<code>results/smoke/notebooks/mnist.ipynb</code>" in note and "jupyter nbconvert" in note
    assert "notebooks" not in display.provenance_note(tmp_path, "paper", "make gpu-session")._repr_html_()


def test_a_dash_for_a_missing_value_keeps_a_column_of_numbers_right_aligned():
    table = display.Table(
        ["training", "ACR"],
        [["Gaussian", display.Raw("1.558")], ["RS, ours", "–"]],
        caption="ACR at σ = 0.5; a dash: not run.",
    )
    assert table.numeric == [False, True]
    assert not display.Table(["a"], [["–"]], caption="Only dashes.").numeric[0]
