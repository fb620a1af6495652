"""How the book shows things: tables, figures and the provenance of its numbers.

Everything a chapter shows goes through here, so that the pages look alike and can be checked:

* :class:`Table` is a table with a caption. In a notebook it renders as an HTML ``<table>``
  (numeric columns right-aligned, one precision per column); as text it is a fixed-width
  table, and :meth:`Table.markdown` gives a Markdown pipe table for files.
* :data:`STYLE` is the book's matplotlib style: figures at most :data:`PAGE_WIDTH` inches wide,
  no text below :data:`MIN_FONT` points, so that they are legible at the width of the page
  without zooming; :func:`use_book_style` applies it (and 2x PNGs) in a notebook,
  :func:`new_figure` makes a figure in it, :func:`check_legible` verifies a figure and
  :func:`glue_figure` hands a checked figure to a ``{glue:figure}`` directive.
* Method colours and dash patterns come from :data:`METHOD_STYLES` only (:func:`method_style`);
  curves that are not methods take :data:`OTHER_COLORS`, which no method uses, and variants of
  one method take shades of its colour (:func:`variant_styles`).
* :func:`provenance_note` says which preset, machine, versions and commit produced the result
  files a page reads (as :func:`rddrs.pipeline.provenance.results_provenance` collects them),
  and the command that recomputes them.

Only numpy and the standard library are imported at module level; matplotlib, IPython and
myst_nb are imported by the functions that need them.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.methods import METHODS as _METHODS
from rddrs.pipeline.provenance import results_provenance

# -- figures ----------------------------------------------------------------------------------

#: widest figure, in inches: at the notebook's 100 dpi it is 650 CSS pixels (some 660 with the
#: margin of a tight bounding box), within the 672-pixel text column of a 1280-pixel window, so
#: that figures are shown at their own size
PAGE_WIDTH = 6.5
#: smallest font size in a figure, in points (as drawn; shown at ~1.04x on the page)
MIN_FONT = 9.0
#: each method's colour (Okabe-Ito, colour-blind safe) and dash pattern, the same in every figure;
#: with the dashes its curves read in grey too
METHOD_STYLES: dict[str, dict[str, str]] = {
    "rs": {"color": "#0072B2", "linestyle": ":"},
    "ddrs": {"color": "#CC79A7", "linestyle": "-."},
    "ancer": {"color": "#009E73", "linestyle": "--"},
    "rddrs": {"color": "#D55E00", "linestyle": "-"},
}
#: colours for curves that are not one of the four methods (Okabe-Ito colours no method uses)
OTHER_COLORS = ("#000000", "#E69F00", "#56B4E9", "#7F7F7F", "#F0E442")
#: the book's matplotlib style
STYLE = {
    "figure.figsize": (PAGE_WIDTH, 3.0),
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "figure.titlesize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.framealpha": 0.9,
    "lines.linewidth": 1.8,
    "grid.color": "0.88",
    "grid.linewidth": 0.8,
}


def _style() -> dict:
    from cycler import cycler

    # curves drawn without a colour never take a method's
    return {**STYLE, "axes.prop_cycle": cycler(color=list(OTHER_COLORS))}


def use_book_style() -> None:
    """Apply :data:`STYLE` to matplotlib and, inside IPython, show figures as 2x PNGs (200 dpi,
    displayed at their size in inches times 100 pixels)."""
    import matplotlib

    matplotlib.rcParams.update(_style())
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the book's extras
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("retina")


def style_context():
    """A context manager in which matplotlib uses :data:`STYLE` (for library figure functions)."""
    import matplotlib

    return matplotlib.rc_context(_style())


def new_figure(nrows: int = 1, ncols: int = 1, *, height: float = 3.0, width: float = PAGE_WIDTH, **subplots):
    """A figure in the book's style, not tied to pyplot, and its axes (``squeeze`` as pyplot's).

    Tick labels take their size now (matplotlib would otherwise read it when the ticks are first
    drawn, outside any style context)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with style_context():
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, **subplots)
    for ax in fig.get_axes():
        ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    return fig, axes


def _texts(fig):
    from matplotlib.text import Text

    fig.canvas.draw()  # creates the tick labels
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def check_legible(fig, width: float = PAGE_WIDTH, min_font: float = MIN_FONT) -> None:
    """Raise :class:`RDDRSError` if ``fig`` is wider than ``width`` inches or has visible text
    smaller than ``min_font`` points (the figure is drawn to find its tick labels)."""
    fig_width = fig.get_size_inches()[0]
    if fig_width > width + 1e-6:
        raise RDDRSError(f"figure is {fig_width:.2f} in wide; the page holds {width:g} in")
    small = sorted(
        {(round(t.get_fontsize(), 1), t.get_text()) for t in _texts(fig) if t.get_fontsize() < min_font - 1e-6}
    )
    if small:
        size, text = small[0]
        raise RDDRSError(f"{len(small)} text(s) under {min_font:g} pt, e.g. {text!r} at {size:g} pt")


def glue_figure(name: str, fig, **checks) -> None:
    """Check ``fig`` (:func:`check_legible`) and glue it under ``name`` for a ``{glue:figure}``
    directive; a pyplot figure is closed so that it is not shown a second time."""
    from myst_nb import glue

    check_legible(fig, **checks)
    glue(name, fig, display=False)
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for a figure that pyplot does not manage


def method_style(method: str) -> dict:
    """Keyword arguments ``color``, ``linestyle`` (:data:`METHOD_STYLES`) and ``label`` (the
    method's, :mod:`rddrs.core.methods`) of a method's curves."""
    return {**METHOD_STYLES[method], "label": _METHODS[method].label}


def _shade(color: str, t: float) -> str:
    """``color`` mixed with white by the fraction ``t``."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * t):02x}" for c in rgb)


_DASHES = ("-", "--", "-.", ":", (0, (5, 1.5, 1, 1.5, 1, 1.5)))
_MARKERS = ("o", "s", "^", "D", "v")


def variant_styles(methods: Sequence[str]) -> list[dict]:
    """One style (``color``, ``linestyle``, ``marker``) per entry of ``methods``: an entry whose
    method is alone keeps the method's colour and dashes; several entries of one method take
    shades of its colour from dark to light, each with its own dashes and marker."""
    count = {m: list(methods).count(m) for m in methods}
    seen: dict[str, int] = {}
    styles = []
    for method in methods:
        k = seen.get(method, 0)
        seen[method] = k + 1
        base = METHOD_STYLES[method]
        if count[method] == 1:
            styles.append({**base, "marker": _MARKERS[0]})
        else:
            t = 0.6 * k / (count[method] - 1)
            styles.append(
                {
                    "color": _shade(base["color"], t) if k else base["color"],
                    "linestyle": _DASHES[k % len(_DASHES)],
                    "marker": _MARKERS[k % len(_MARKERS)],
                }
            )
    return styles


# -- tables -----------------------------------------------------------------------------------


class Raw(str):
    """A string of trusted HTML for a table cell, header or caption (its tags are stripped in
    the text and Markdown forms)."""


_NUMERIC_CHARS = re.compile(r"[\d\s.,+\-−±×/%()\[\]≈<>–e]+")
_UNITS = re.compile(r"\s*(s|ms|µs|min|h|days|×|%)$")
_TAGS = re.compile(r"<[^>]+>")
Format = str | Callable[[object], str] | None


def _reads_as_number(text: str) -> bool:
    """ "0.52 / 0.48", "+0.012 ± 0.004", "1.2e-03", "3.1 s": digits, signs and separators only."""
    text = _UNITS.sub("", text.strip())
    return bool(text) and bool(re.search(r"\d", text)) and bool(_NUMERIC_CHARS.fullmatch(text))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: str) -> str:
    return html.unescape(_TAGS.sub("", value)) if isinstance(value, Raw) else value


#: what a cell holds where it has no value: it does not make a column of numbers a column of text
_MISSING = {"–", "-", "—", ""}
_SUPERSCRIPT = re.compile(r"\^\(([^()]+)\)|\^([−-]?\d+(?:\.\d+)?|\w+)")
_SUBSCRIPT = re.compile(r"(?<![\w*])([A-Za-zα-ωΑ-Ωℓ]\*?)_(\{[^}]+\}|\w+)")
_ELL = re.compile(r"ℓ([12∞])(?![\d.])")
_INDEX = re.compile(r"(?<![\w.])([nx])(\d)(?![\w.])")  # n0, x1: a count or a coordinate with its index


def typeset(text: str) -> str:
    """Plain-text maths of a caption, a header or a note as HTML (escaped): ``10^4``, ``[0, 1]^784``
    and ``det(S)^(1/d)`` with superscripts, ``σ*_x``, ``p_A`` and ``λ_min`` with subscripts (one
    letter, possibly starred, before the underscore, so that names such as ``max_step`` stay),
    ``ℓ2`` as ℓ with a subscript 2, ``n0`` and ``x1`` with their index. :class:`Raw` HTML is returned as it
    is."""
    if isinstance(text, Raw):
        return str(text)
    out = html.escape(str(text))
    out = _SUPERSCRIPT.sub(lambda m: f"<sup>{m.group(1) or m.group(2)}</sup>", out)
    out = _SUBSCRIPT.sub(lambda m: f"{m.group(1)}<sub>{m.group(2).strip('{}')}</sub>", out)
    out = _INDEX.sub(r"\1<sub>\2</sub>", out)
    return _ELL.sub(r"ℓ<sub>\1</sub>", out)


def auto_decimals(values: Sequence[float]) -> int | None:
    """Decimals that give the largest value of a column three significant digits (0 to 4), or
    ``None`` when the column needs exponents (all non-zero values below 1e-3)."""
    finite = [abs(float(v)) for v in values if _is_number(v) and math.isfinite(v) and v != 0]
    if not finite:
        return 0
    top = max(finite)
    if top < 1e-3:
        return None
    return int(min(4, max(0, 2 - math.floor(math.log10(top)))))


def format_number(value, spec: Format = None, decimals: int | None = 3) -> str:
    """One cell: ``spec`` (a format spec or a function) if given, else integers as they are
    (grouped by thousands from 10 000), floats with ``decimals`` decimals (exponent form if
    ``None``), NaN and ``None`` as a dash. A format spec applies to numbers; text in a
    formatted column (a note such as "diverged") is shown as it is."""
    if value is None or (_is_number(value) and isinstance(value, float) and math.isnan(value)):
        return "–"
    if callable(spec):
        return spec(value)
    if spec is not None and _is_number(value):
        return format(value, spec)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    if _is_number(value):
        value = float(value)
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.2e}" if decimals is None else f"{value:.{decimals}f}"
    return value if isinstance(value, Raw) else str(value)


def signed(value: float, se: float | None = None) -> str:
    """A signed difference, and its standard error if given, to a precision that shows them: two
    significant digits of the error (of the value when there is none), never "-0.000"."""
    scale = se if se is not None and math.isfinite(se) and se > 0 else abs(value)
    decimals = 2 if not scale else min(8, max(2, 1 - math.floor(math.log10(scale))))
    text = f"{value:+.{decimals}f}"
    if float(text) == 0:
        text = text[1:]
    return text if se is None or not math.isfinite(se) else f"{text} ± {se:.{decimals}f}"


class Table:
    """A table with a caption, shown as HTML in a notebook and as fixed-width text elsewhere.

    ``columns`` are the headers; ``rows`` hold numbers, strings or :class:`Raw` HTML. Each
    numeric column gets one precision: ``formats[header]`` (a format spec such as ``".2f"``
    or a function) if given, otherwise three significant digits for its largest value
    (:func:`auto_decimals`). A column whose cells are all numbers, or strings that read as
    numbers ("0.52 / 0.48", "+0.012 ± 0.004"), or a dash where there is no value, is right-aligned;
    others are left-aligned.

    ``spans`` puts a header row above the columns: ``(label, number of columns)`` pairs that
    cover all columns (an empty label leaves its columns without). ``merge`` names leading
    columns (e.g. "σ") whose value is written only where it changes, and a rule starts each
    group. ``notes`` is a line printed under the table.
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence],
        caption: str,
        *,
        formats: Mapping[str, Format] | None = None,
        spans: Sequence[tuple[str, int]] | None = None,
        merge: Sequence[str] = (),
        notes: str | None = None,
    ):
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]
        if not str(caption).strip():
            raise RDDRSError("a table needs a caption that says what it holds")
        self.caption = caption
        self.notes = notes
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise RDDRSError(f"table row {i} has {len(row)} cells for {len(self.columns)} columns")
        formats = dict(formats or {})
        unknown = sorted((set(formats) | set(merge)) - set(self.columns))
        if unknown:
            raise RDDRSError(f"formats or merge for unknown column(s) {', '.join(unknown)}")
        self.spans = [(str(label), int(n)) for label, n in spans] if spans else None
        if self.spans and sum(n for _, n in self.spans) != len(self.columns):
            raise RDDRSError(f"spans cover {sum(n for _, n in self.spans)} of {len(self.columns)} columns")
        self.cells: list[list[str]] = [[""] * len(self.columns) for _ in self.rows]
        self.numeric: list[bool] = []
        for j, name in enumerate(self.columns):
            values = [row[j] for row in self.rows]
            decimals = auto_decimals(values)
            for i, value in enumerate(values):
                self.cells[i][j] = format_number(value, formats.get(name), decimals)
            self.numeric.append(
                bool(values)
                and all(
                    value is None
                    or _is_number(value)
                    or _reads_as_number(_plain(str(value)))
                    or _plain(str(value)).strip() in _MISSING
                    for value in values
                )
                and any(_is_number(value) or _reads_as_number(_plain(str(value))) for value in values)
            )
        # merged leading columns: a group starts where any of them changes
        width = len(merge)
        if list(merge) != self.columns[:width]:
            raise RDDRSError(f"merge must name leading columns, got {list(merge)}")
        keys = [tuple(row[:width]) for row in self.cells]
        self.starts = [width > 0 and i > 0 and keys[i] != keys[i - 1] for i in range(len(keys))]
        self.shown = [
            [c if j >= width or i == 0 or keys[i] != keys[i - 1] else "" for j, c in enumerate(row)]
            for i, row in enumerate(self.cells)
        ]

    # text forms
    def _text_cells(self, merged: bool = True) -> list[list[str]]:
        body = self.shown if merged else self.cells
        return [[_plain(c) for c in self.columns]] + [[_plain(c) for c in row] for row in body]

    def __repr__(self) -> str:
        lines = self._text_cells()
        widths = [max(len(line[j]) for line in lines) for j in range(len(self.columns))]

        def fmt(line):
            return "  ".join(
                c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, self.numeric)
            ).rstrip()

        head = []
        if self.spans:
            at, parts = 0, []
            for label, n in self.spans:
                span = sum(widths[at : at + n]) + 2 * (n - 1)
                parts.append(_plain(label).center(span)[:span])
                at += n
            head.append("  ".join(parts).rstrip())
        body = head + [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]]
        return "\n".join([_plain(self.caption), *body] + ([_plain(self.notes)] if self.notes else []))

    __str__ = __repr__

    def markdown(self) -> str:
        """A Markdown pipe table (for files; the book shows the HTML form). Spanning labels are
        prefixed to their columns' headers; merged columns are written on every row."""
        lines = self._text_cells(merged=False)
        if self.spans:
            labels = [label for label, n in self.spans for _ in range(n)]
            lines[0] = [f"{label} {c}".strip() if label else c for label, c in zip(labels, lines[0])]
        align = ["---:" if num else ":---" for num in self.numeric]
        out = ["| " + " | ".join(lines[0]) + " |", "| " + " | ".join(align) + " |"]
        out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        return "\n".join(out) + "\n"

    # HTML form
    @staticmethod
    def _html(value: str) -> str:
        return str(value) if isinstance(value, Raw) else html.escape(str(value))

    #: text cells longer than this wrap, with a minimum width (a narrow column of long text would
    #: otherwise be one word a line); shorter ones, and cells that read as numbers, never break
    WRAP_AT = 24

    def _repr_html_(self) -> str:
        def cell(tag, value, num, header=False):
            kind, side = ("num", "right") if num else ("text", "left")
            text = _plain(value)
            if not num and not header and (_reads_as_number(text) if text.strip() else False):
                kind += " nb"
            elif not num and not header and len(text) > self.WRAP_AT:
                kind += " wrap"
            shown = typeset(value) if header else self._html(value)
            return f'<{tag} class="{kind}" style="text-align: {side}">{shown}</{tag}>'

        spans = ""
        if self.spans:
            spans = (
                "<tr>"
                + "".join(
                    f'<th class="span" colspan="{n}">{typeset(label)}</th>' if label else f'<th colspan="{n}"></th>'
                    for label, n in self.spans
                )
                + "</tr>"
            )
        head = "".join(cell("th", c, num, header=True) for c, num in zip(self.columns, self.numeric))
        group = ' class="group"'
        body = "".join(
            f"<tr{group if start else ''}>" + "".join(cell("td", c, num) for c, num in zip(row, self.numeric)) + "</tr>"
            for row, start in zip(self.shown, self.starts)
        )
        notes = f'<p class="rddrs-table-notes">{typeset(self.notes)}</p>' if self.notes else ""
        return (
            f'<div class="rddrs-table-wrapper"><table class="rddrs-table">'
            f"<caption>{typeset(self.caption)}</caption>"
            f"<thead>{spans}<tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}</div>"
        )


# -- where the numbers come from ----------------------------------------------------------------


class Note:
    """A boxed note (an admonition in the HTML page, plain lines as text)."""

    def __init__(self, title: str, paragraphs: Sequence[str]):
        self.title = title
        self.paragraphs = list(paragraphs)  # Raw HTML or plain text

    def __repr__(self) -> str:
        return "\n".join([self.title, *(_plain(p) for p in self.paragraphs)])

    def _repr_html_(self) -> str:
        body = "".join(f"<p>{Table._html(p)}</p>" for p in self.paragraphs)
        return (
            f'<div class="admonition note rddrs-provenance"><p class="admonition-title">'
            f"{html.escape(self.title)}</p>{body}</div>"
        )


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _words(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def provenance_note(results_dir, preset: str, rerun: str) -> Note:
    """The note at the top of a heavy chapter: which preset, machine, versions and commit
    produced the result files it reads from ``results_dir``, and the command ``rerun`` that
    recomputes them (a run resumes from the rows already there)."""
    info = results_provenance(results_dir)
    shown = Path(results_dir).as_posix().removeprefix("../")
    if not info["files"]:
        first = Raw(
            f"No result files in {_code(shown)} yet for preset {_code(preset)}: this "
            f"execution computes them, and the numbers below come from it."
        )
    else:
        dates = info["first"] if info["first"] == info["last"] else f"{info['first']} to {info['last']}"
        presets = _words([_code(p) for p in sorted(info["presets"])]) or _code(preset)
        machines = (
            _words(
                [
                    html.escape(device)
                    + (
                        f" ({_words([str(t) for t in sorted(threads)])} thread{'s' * (threads != {1})})"
                        if threads
                        else ""
                    )
                    for device, threads in sorted(info["machines"].items())
                ]
            )
            or "an unrecorded machine"
        )
        versions = _words([html.escape(v) for v in sorted(info["versions"])]) or "unrecorded versions"
        if info["commits"]:
            commit = (
                f"The runs recorded commit{'s' * (len(info['commits']) > 1)} "
                f"{_words([_code(c) for c in sorted(info['commits'])])}"
                + (" (some with uncommitted changes)" if info["dirty"] else "")
                + (f"; {info['uncommitted']} recorded none" if info["uncommitted"] else "")
            )
        else:
            commit = "The runs recorded no commit"
        if info["stored"]:
            commit += f"; the files were committed in {_code(info['stored'][0])} ({info['stored'][1]})"
        first = Raw(
            f"Preset {presets}: {info['files']} result files in {_code(shown)}, computed "
            f"{dates or 'at an unrecorded date'} on {machines} with {versions}. {commit}."
        )
    again = (
        f"Re-run with {_code(rerun)}; runs resume from the rows already written, so only missing results are computed."
    )
    chapter = re.search(r"\bmake results\b.*\bCHAPTERS=(\w+)", rerun)
    preset_run = re.search(r"\bPRESET=(\w+)", rerun)
    if chapter:  # make results writes the executed notebook beside the results
        where = f"results/{preset_run.group(1) if preset_run else 'cpu'}/notebooks/{chapter.group(1)}.ipynb"
        again += (
            f" It writes this page as an executed notebook to {_code(where)}; open it with "
            f"{_code('jupyter lab')}, or make it a web page with {_code('jupyter nbconvert --to html')}."
        )
    return Note("Where the numbers on this page come from", [first, Raw(again)])
