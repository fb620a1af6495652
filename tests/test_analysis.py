"""Tests of ``rddrs.studies.analysis``: reading result files, certified accuracy, ACR, tables, figure, CLI.

Every expected number is worked out by hand from small TSV files written here; nothing is
compared with a value produced by the code under test.
"""

from __future__ import annotations

import csv
import json
import struct

import numpy as np
import pytest
from helpers import run_bound_by_permissions

from rddrs import RDDRSError
from rddrs.cli import build_parser
from rddrs.studies import analysis
from rddrs.studies.analysis import (
    METHOD_LABELS,
    average_certified_radius,
    certified_accuracy,
    curves_figure,
    group_results,
    read_results,
    table,
    write_tables,
)
from rddrs.studies.display import METHOD_STYLES, check_legible

HEADER = "idx\tlabel\tpredict\tcorrect\tgap\tradius\tproxy_radius\tsigma_min\tseconds"

# Five inputs: two correct, one abstain (with a positive radius written anyway), one wrong
# prediction with a positive radius, one correct with the largest radius.
#            idx label predict correct gap  radius proxy  sigma_min seconds
FIVE = [
    (0, 3, 3, 1, 1.0, 0.30, 0.50, 0.25, 1.0),
    (1, 7, -1, 0, 0.0, 0.90, 2.00, 0.25, 2.0),  # abstain: never counts
    (2, 1, 4, 0, 2.0, 0.80, 1.50, 0.25, 3.0),  # wrong with a radius: never counts
    (3, 0, 0, 1, 3.0, 0.60, 1.00, 0.25, 4.0),
    (4, 9, 9, 1, 5.0, 1.20, 1.00, 0.25, 5.0),
]


def write_results(path, rows=FIVE, meta=None, header=HEADER, extra=None):
    """Write a result file (and its sidecar unless meta is False); return its path."""
    lines = [header + ("\textra" if extra else "")]
    for row in rows:
        line = "\t".join(str(v) for v in row)
        lines.append(line + ("\tfoo" if extra else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if meta is not False:
        sidecar = {"method": "rs", "sigma": 0.25, "preset": "cpu"}
        sidecar.update(meta or {})
        (path.parent / (path.name + ".json")).write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def synthetic_rows(n, scale, seed, p_correct=0.9, p_abstain=0.05):
    """Plausible rows: correct inputs get exponential-ish radii; l2 radius <= proxy radius."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(10))
        u = rng.random()
        if u < p_abstain:
            predict = -1
        elif u < p_abstain + (1 - p_correct):
            predict = (label + 1) % 10
        else:
            predict = label
        correct = int(predict == label)
        proxy = float(rng.gamma(2.0, scale)) if predict >= 0 else 0.0
        l2 = proxy * float(rng.uniform(0.4, 1.0))
        rows.append(
            (
                i,
                label,
                predict,
                correct,
                round(proxy / 0.25, 4),
                round(l2, 4),
                round(proxy, 4),
                0.25,
                round(float(rng.uniform(0.1, 0.3)), 4),
            )
        )
    return rows


def curves(*argv):
    """``rddrs curves ARGV`` as the command line parses and runs it (its errors raised, not printed)."""
    args = build_parser().parse_args(["curves", *argv])
    args.run(args)


# --------------------------------------------------------------------------- reading
def test_read_results_columns_and_sidecar(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv", extra=True))
    assert res.n == 5
    assert res.idx.tolist() == [0, 1, 2, 3, 4]
    assert res.predict.tolist() == [3, -1, 4, 0, 9]
    assert res.correct.tolist() == [1, 0, 0, 1, 1]
    assert res.radius.tolist() == [0.30, 0.90, 0.80, 0.60, 1.20]
    assert res.proxy_radius.tolist() == [0.50, 2.00, 1.50, 1.00, 1.00]
    assert (res.method, res.sigma, res.preset) == ("rs", 0.25, "cpu")
    assert res.meta["preset"] == "cpu"


def test_columns_in_any_order(tmp_path):
    cols = HEADER.split("\t")
    order = cols[::-1]
    rows = [tuple(dict(zip(cols, r))[c] for c in order) for r in FIVE]
    res = read_results(write_results(tmp_path / "a.tsv", rows=rows, header="\t".join(order)))
    assert res.proxy_radius.tolist() == [0.50, 2.00, 1.50, 1.00, 1.00]
    assert res.label.tolist() == [3, 7, 1, 0, 9]


# --------------------------------------------------------------------------- statistics
def test_certified_accuracy_by_hand(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    # correct inputs: proxy radii 0.5, 1.0, 1.0 ; l2 radii 0.3, 0.6, 1.2 ; n = 5
    radii = [0.0, 0.5, 0.50001, 1.0, 1.2, 1.5, 2.0]
    proxy = certified_accuracy(res, radii, kind="proxy")
    np.testing.assert_allclose(proxy, [3 / 5, 3 / 5, 2 / 5, 2 / 5, 0, 0, 0])
    l2 = certified_accuracy(res, radii, kind="l2")
    np.testing.assert_allclose(l2, [3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 0, 0])


def test_certified_accuracy_at_zero_is_fraction_correct_not_abstaining(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    expected = np.mean((res.predict == res.label) & (res.predict != -1))
    assert certified_accuracy(res, [0.0], "proxy")[0] == pytest.approx(expected)
    assert certified_accuracy(res, 0.0, "l2") == pytest.approx(0.6)


def test_abstain_and_wrong_with_large_radius_never_count(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    # the abstain (proxy 2.0) and the wrong prediction (proxy 1.5) have the largest radii
    assert certified_accuracy(res, [1.4, 1.9], "proxy").tolist() == [0.0, 0.0]
    assert certified_accuracy(res, [0.85], "l2").tolist() == [pytest.approx(0.2)]


def test_certified_accuracy_non_increasing(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv", rows=synthetic_rows(300, 0.4, 1)))
    grid = np.linspace(0, 5, 501)
    for kind in ("proxy", "l2"):
        ca = certified_accuracy(res, grid, kind)
        assert np.all(np.diff(ca) <= 0)
        assert ca[0] > 0.5 and ca[-1] < ca[0]


def test_average_certified_radius_by_hand(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    assert average_certified_radius(res, "proxy") == pytest.approx((0.5 + 1.0 + 1.0) / 5)
    assert average_certified_radius(res, "l2") == pytest.approx((0.3 + 0.6 + 1.2) / 5)
    per_input = analysis.certified_radius(res, "l2")  # wrong and abstaining inputs certify 0
    assert per_input.shape == (5,) and sorted(per_input) == pytest.approx([0.0, 0.0, 0.3, 0.6, 1.2])
    assert per_input.mean() == pytest.approx(average_certified_radius(res, "l2"))


def test_unknown_kind_is_an_error(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    with pytest.raises(RDDRSError, match="kind"):
        certified_accuracy(res, [0.0], kind="linf")


# --------------------------------------------------------------------------- tables
def three_sigma_groups(tmp_path, methods=("rs", "ddrs", "ancer", "rddrs"), sigmas=(0.12, 0.25, 0.5), n=60):
    results = []
    for j, sigma in enumerate(sigmas):
        for k, method in enumerate(methods):
            path = write_results(
                tmp_path / f"{method}_{sigma}.tsv",
                rows=synthetic_rows(n, sigma * (1 + 0.3 * k), 10 * j + k),
                meta={"method": method, "sigma": sigma},
            )
            results.append(read_results(path))
    return results


def test_table_numbers_match_certified_accuracy(tmp_path):
    results = three_sigma_groups(tmp_path)
    radii = (0.0, 0.25, 0.5, 1.0)
    rows = table(results, radii=radii, kind="l2")
    assert [(r["sigma"], r["method"]) for r in rows] == [
        (s, m) for s in (0.12, 0.25, 0.5) for m in ("rs", "ddrs", "ancer", "rddrs")
    ]
    by_key = {(r.sigma, r.method): r for r in results}
    for row in rows:
        res = by_key[(row["sigma"], row["method"])]
        assert row["n"] == 60
        # independent count
        rad = res.radius
        expected = [np.sum((res.correct == 1) & (rad >= r)) / 60 for r in radii]
        np.testing.assert_allclose(row["accuracy"], expected)
        assert row["acr"] == pytest.approx(np.sum(rad * res.correct) / 60)
        assert row["acr_se"] == pytest.approx(np.std(rad * (res.correct == 1), ddof=1) / np.sqrt(60))
        assert row["seconds"] == pytest.approx(np.mean(res.seconds))


def test_markdown_and_csv_tables(tmp_path):
    results = three_sigma_groups(tmp_path, methods=("rs", "rddrs"))
    rows = table(results, radii=(0, 0.5, 1), kind="proxy")
    write_tables(rows, tmp_path / "t.csv", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text(encoding="utf-8").strip().splitlines()
    assert md[0].startswith(
        "| σ | method | n | certified accuracy at r = 0 | certified accuracy at r = 0.5 "
        "| certified accuracy at r = 1 | ACR"
    )
    assert set(md[1].replace("|", "").split()) <= {"---:", ":---"}
    assert len(md) == 2 + 6
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert [(b[0], b[1]) for b in body] == [
        ("0.12", "RS"),
        ("0.12", "RDDRS"),
        ("0.25", "RS"),
        ("0.25", "RDDRS"),
        ("0.50", "RS"),
        ("0.50", "RDDRS"),
    ]
    for b, row in zip(body, rows):
        assert b[3:6] == [f"{a:.2f}" for a in row["accuracy"]]  # 60 inputs: counts / 60 need 2 decimals
    with open(tmp_path / "t.csv", newline="") as fh:
        table_rows = list(csv.reader(fh))
    assert table_rows[0] == ["sigma", "method", "n", "ca@0", "ca@0.5", "ca@1", "acr", "seconds_per_input"]
    assert len(table_rows) == 7
    assert all(len(r[3].split(".")[1]) == 3 for r in table_rows[1:])  # fixed decimals
    res = {(r.sigma, r.method): r for r in results}[(0.25, "rddrs")]
    got = next(r for r in table_rows[1:] if r[:2] == ["0.25", "rddrs"])
    assert float(got[4]) == pytest.approx(np.sum((res.correct == 1) & (res.proxy_radius >= 0.5)) / res.n, abs=5e-4)


# --------------------------------------------------------------------------- figure
def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_figure_layout(tmp_path):
    results = three_sigma_groups(tmp_path, methods=("rs", "ddrs", "ancer", "rddrs"))
    out = tmp_path / "fig.png"
    fig = curves_figure(results, "proxy", out)
    assert out.stat().st_size > 10_000
    width, height = png_size(out)
    assert 1250 <= width <= 1350 and 500 <= height <= 700  # the page's 6.5 x 2.95 in at 200 dpi
    check_legible(fig)  # as wide as the page at most, no text under 9 pt
    axes = fig.get_axes()
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == ["σ = 0.12", "σ = 0.25", "σ = 0.5"]
    colours, styles = {}, {}
    for ax in axes:
        assert ax.get_ylim() == (0.0, 1.0)
        assert ax.get_xlim()[0] == 0.0
        assert "proxy radius" in ax.get_xlabel()
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["RS", "DDRS", "ANCER", "RDDRS"]
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
            styles.setdefault(line.get_label(), set()).add(line.get_linestyle())
            y = line.get_ydata()
            assert np.all(np.diff(y) <= 0) and y[-1] == 0.0
        top = max(np.max(line.get_xdata()) for line in ax.get_lines())
        assert ax.get_xlim()[1] >= top
    (legend,) = fig.legends  # one legend for the three panels
    assert [t.get_text() for t in legend.get_texts()] == ["RS", "DDRS", "ANCER", "RDDRS"]
    assert axes[0].get_ylabel() == "certified accuracy"
    assert all(len(c) == 1 for c in colours.values())  # one colour per method
    assert len(set().union(*colours.values())) == 4  # four different colours
    assert len(set().union(*styles.values())) == 4  # and four dash patterns
    for method, label in METHOD_LABELS.items():  # those of rddrs.studies.display
        assert colours[label] == {METHOD_STYLES[method]["color"]}
        assert styles[label] == {METHOD_STYLES[method]["linestyle"]}


def test_curve_steps_follow_certified_accuracy(tmp_path):
    res = read_results(write_results(tmp_path / "a.tsv"))
    fig = curves_figure([res], "l2")
    (ax,) = fig.get_axes()
    (line,) = ax.get_lines()
    assert line.get_drawstyle() == "steps-pre"
    x, y = line.get_xdata(), line.get_ydata()
    # step(where="pre"): value y[i] on (x[i-1], x[i]]
    for r in (0.1, 0.45, 0.9, 1.1, 1.25):
        i = np.searchsorted(x, r, side="left")
        assert y[i] == pytest.approx(certified_accuracy(res, [r], "l2")[0])
    assert ax.get_xlabel() == r"$\ell_2$ radius"
    assert ax.get_xlim()[1] == pytest.approx(1.05 * 1.2)


@pytest.mark.parametrize("ext, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_figure_format_by_extension(tmp_path, ext, magic):
    res = read_results(write_results(tmp_path / "a.tsv"))
    out = tmp_path / f"fig{ext}"
    curves_figure([res], "proxy", out)
    assert out.read_bytes().startswith(magic)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda h, rows: (h.replace("\tproxy_radius", ""), [r[:6] + r[7:] for r in rows]),
            r"line 1: missing column proxy_radius",
        ),
        (lambda h, rows: (h, rows[:3] + [(1,) + rows[3][1:]] + rows[4:]), r"line 5: idx 1 already on line 3"),
        (
            lambda h, rows: (h, rows[:2] + [rows[2][:4] + ("abc",) + rows[2][5:]] + rows[3:]),
            r"line 4: column 'gap': 'abc' is not a number",
        ),
        (
            lambda h, rows: (h, rows[:1] + [("x",) + rows[1][1:]] + rows[2:]),
            r"line 3: column 'idx': 'x' is not an integer",
        ),
        (lambda h, rows: (h, rows[:1] + [rows[1][:5]] + rows[2:]), r"line 3: 5 fields, the header has 9"),
        (
            lambda h, rows: (h, [rows[0][:3] + (0,) + rows[0][4:]] + rows[1:]),
            r"line 2: correct=0 but predict=3 and label=3",
        ),
        (lambda h, rows: (h, []), r"no result rows"),
    ],
)
def test_malformed_files(tmp_path, mutate, match):
    header, rows = mutate(HEADER, list(FIVE))
    path = write_results(tmp_path / "bad.tsv", rows=rows, header=header)
    with pytest.raises(RDDRSError, match=match) as err:
        read_results(path)
    assert "bad.tsv" in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(RDDRSError, match="nope.tsv: no such result file"):
        read_results(tmp_path / "nope.tsv")


def test_bad_sidecar(tmp_path):
    path = write_results(tmp_path / "a.tsv")
    (tmp_path / "a.tsv.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RDDRSError, match=r"a.tsv.json is not valid JSON \(line 1: "):
        read_results(path)
    (tmp_path / "a.tsv.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RDDRSError, match=r"a.tsv.json holds list, not a JSON object"):
        read_results(path)


def test_duplicated_method_sigma(tmp_path):
    a = read_results(write_results(tmp_path / "a.tsv"))
    b = read_results(write_results(tmp_path / "b.tsv"))
    with pytest.raises(
        RDDRSError,
        match=r"two result files for method rs at sigma 0.25: .*a.tsv "
        r"and .*b.tsv",
    ):
        group_results([a, b])
    # the same file twice is fine
    assert len(group_results([a, read_results(tmp_path / "a.tsv")])) == 1


def test_mixed_presets(tmp_path):
    a = read_results(write_results(tmp_path / "a.tsv", meta={"preset": "cpu"}))
    b = read_results(write_results(tmp_path / "b.tsv", meta={"preset": "paper", "method": "rddrs"}))
    with pytest.raises(RDDRSError, match=r"different presets.*'cpu'.*'paper'"):
        curves_figure([a, b], "proxy")
    with pytest.raises(RDDRSError, match="different presets"):
        table([a, b])


def test_missing_sidecar(tmp_path):
    path = write_results(tmp_path / "a.tsv", meta=False)
    res = read_results(path)
    with pytest.raises(RDDRSError, match=r"no sidecar a.tsv.json; give the method and sigma"):
        group_results([res])
    res = read_results(path, method="ddrs", sigma=0.5)
    assert (res.method, res.sigma, res.preset) == ("ddrs", 0.5, None)
    assert list(group_results([res])) == [(0.5, "ddrs")]


def test_command_line_value_contradicting_sidecar(tmp_path):
    path = write_results(tmp_path / "a.tsv")
    with pytest.raises(RDDRSError, match="sidecar says 'rs'"):
        read_results(path, method="rddrs")


# --------------------------------------------------------------------------- CLI
def test_cli_writes_figures_and_tables(tmp_path, capsys):
    three_sigma_groups(tmp_path, methods=("rs", "rddrs"), sigmas=(0.25, 0.5))
    files = sorted(str(p) for p in tmp_path.glob("*.tsv"))
    out = tmp_path / "out"
    curves(*files, "--out", str(out), "--radii", "0,0.5,1")
    names = {p.name for p in out.iterdir()}
    assert names == {
        "certified_accuracy_proxy.png",
        "certified_accuracy_l2.png",
        "table_proxy.csv",
        "table_proxy.md",
        "table_l2.csv",
        "table_l2.md",
    }
    for kind in ("proxy", "l2"):
        png_size(out / f"certified_accuracy_{kind}.png")
    printed = capsys.readouterr().out
    md = (out / "table_proxy.md").read_text(encoding="utf-8")
    assert md in printed and (out / "table_l2.md").read_text(encoding="utf-8") in printed
    assert md.count("\n") == 2 + 4 and "r = 0.5" in md


def test_cli_single_kind_and_missing_sidecar(tmp_path, capsys):
    path = write_results(tmp_path / "a.tsv", meta=False)
    out = tmp_path / "out"
    with pytest.raises(RDDRSError, match="no sidecar"):
        curves(str(path), "--out", str(out))
    curves(str(path), "--out", str(out), "--kind", "l2", "--method", "ancer", "--sigma", "0.12")
    assert {p.name for p in out.iterdir()} == {"certified_accuracy_l2.png", "table_l2.csv", "table_l2.md"}
    md = (out / "table_l2.md").read_text(encoding="utf-8")
    assert "| 0.12 | ANCER | 5 | 0.60 | 0.40 |" in md  # CA at r = 0, 0.5 (l2 radii), 5 inputs


def test_cli_errors(tmp_path):
    a = write_results(tmp_path / "a.tsv")
    b = write_results(tmp_path / "b.tsv", meta={"preset": "smoke", "method": "ddrs"})
    with pytest.raises(RDDRSError, match="--radii: 'x' is not a number"):
        curves(str(a), "--out", str(tmp_path / "o"), "--radii", "0,x")
    with pytest.raises(RDDRSError, match="'cpu'.*'smoke'"):
        curves(str(a), str(b), "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit):
        curves(str(a), "--out", str(tmp_path / "o"), "--kind", "linf")


def test_sidecar_keys_nested_in_settings(tmp_path):
    path = write_results(tmp_path / "a.tsv", meta=False)
    (tmp_path / "a.tsv.json").write_text(
        json.dumps({"settings": {"method": "rddrs", "sigma": 0.12, "preset": "smoke", "n": 200}, "provenance": {}}),
        encoding="utf-8",
    )
    res = read_results(path)
    assert (res.method, res.sigma, res.preset) == ("rddrs", 0.12, "smoke")


def test_cli_says_when_it_leaves_out_half_a_row(tmp_path, capsys):
    path = write_results(tmp_path / "a.tsv")
    with open(path, "a", encoding="utf-8") as f:
        f.write("5\t2\t2\t1\t0.5")  # a run writing its next row
    curves(str(path), "--out", str(tmp_path / "out"), "--kind", "proxy")
    captured = capsys.readouterr()
    assert (
        captured.err == f"note: {path} ends in half a row (its run is still writing it, or was stopped); "
        "that row is left out\n"
    )
    assert "| 0.25 | RS | 5 |" in captured.out  # the five complete rows
    write_results(path)
    curves(str(path), "--out", str(tmp_path / "out"), "--kind", "proxy")
    assert capsys.readouterr().err == ""


def test_cli_into_a_read_only_directory_is_one_line(tmp_path):
    path = write_results(tmp_path / "a.tsv")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    proc = run_bound_by_permissions(["curves", path, "--out", out], tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"rddrs curves: error: cannot write {out}/") and "PermissionError" in err
    assert not any(out.iterdir())
